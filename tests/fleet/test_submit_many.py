"""tasks.submit_many and tasks.ended_keys against a real PostgreSQL: a submitter's batch in
one statement, with the same answers submit gives one task at a time."""
from __future__ import annotations

import threading

import psycopg
import pytest

from agent.fleet import nodes, schema, tasks
from agent.fleet.records import Report, Submission


@pytest.fixture
def conn(fleet_dsn):
    with psycopg.connect(fleet_dsn, autocommit=True) as conn:
        schema.migrate(conn)
        yield conn


def sub(key, *command, **kw):
    return Submission(key, tuple(command or ("true",)), **kw)


def test_a_new_batch_is_created_and_queued_in_its_order(conn):
    batch = [sub(f"k{i}", "echo", str(i)) for i in (3, 1, 2)]
    assert tasks.submit_many(conn, batch, "me") == ["created"] * 3
    rows = conn.execute("SELECT key, command, state, submitted_by FROM agent_fleet_tasks "
                        "ORDER BY seq").fetchall()
    assert rows == [("k3", ["echo", "3"], "queued", "me"), ("k1", ["echo", "1"], "queued", "me"),
                    ("k2", ["echo", "2"], "queued", "me")]


def test_every_field_of_a_submission_is_stored(conn):
    task = Submission("k", ("sleep", "1"), timeout=2.5, limits=(("nofile", 64),),
                      labels=(("os", "linux"),), max_attempts=7)
    tasks.submit_many(conn, [task, sub("plain")], None)
    stored = tasks.get(conn, "k")
    assert (stored.command, stored.timeout, stored.limits, stored.labels, stored.max_attempts) == (
        ("sleep", "1"), 2.5, {"nofile": 64}, {"os": "linux"}, 7)
    assert tasks.get(conn, "plain").timeout is None


def test_known_keys_attach_with_the_same_command_and_conflict_with_another(conn):
    tasks.submit(conn, sub("a", "echo", "a"), "first")
    tasks.submit(conn, sub("b", "echo", "b"), "first")
    answers = tasks.submit_many(conn, [sub("a", "echo", "a"), sub("new"), sub("b", "rm", "-rf")],
                                "second")
    assert answers == ["attached", "created", "conflict"]
    assert tasks.get(conn, "b").command == ("echo", "b")
    assert tasks.get(conn, "a").submitted_by == "first"


def test_the_same_key_twice_in_a_batch_is_created_once(conn):
    answers = tasks.submit_many(conn, [sub("x", "true"), sub("x", "true"), sub("x", "false")],
                                None)
    assert answers == ["created", "attached", "conflict"]
    assert conn.execute("SELECT count(*) FROM agent_fleet_tasks").fetchone()[0] == 1


def test_an_empty_batch_does_nothing(conn):
    assert tasks.submit_many(conn, [], None) == []


def test_a_batch_wakes_the_nodes_once(conn, fleet_dsn):
    with psycopg.connect(fleet_dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {tasks.QUEUED}")
        tasks.submit_many(conn, [sub(f"k{i}") for i in range(5)], None)
        tasks.submit_many(conn, [sub("k1")], None)  # nothing new: no wake-up
        notes = list(listener.notifies(timeout=0.5))
    assert [n.channel for n in notes] == [tasks.QUEUED]


def test_two_submitters_of_one_batch_at_once_create_each_task_once(conn, fleet_dsn):
    batch = [sub(f"k{i}", "echo", str(i)) for i in range(300)]
    answers = {}

    def submit(name):
        with psycopg.connect(fleet_dsn, autocommit=True) as own:
            answers[name] = tasks.submit_many(own, batch, name)
    threads = [threading.Thread(target=submit, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(answers["a"]) == len(answers["b"]) == 300
    assert all({a, b} == {"created", "attached"} for a, b in zip(answers["a"], answers["b"]))
    assert conn.execute("SELECT count(*) FROM agent_fleet_tasks").fetchone()[0] == 300


def test_ended_keys_names_only_the_tasks_that_ended(conn):
    tasks.submit_many(conn, [sub("done"), sub("running"), sub("queued"), sub("gone")], None)
    node = nodes.register(conn, "n1", {}, 2, 30.0, None, None)
    claimed = tasks.claim(conn, "n1", node.generation, {}, 2)
    assert [c.key for c in claimed] == ["done", "running"]
    tasks.report(conn, "done", 1, "n1", node.generation, Report("exited", 0))
    tasks.cancel(conn, "gone")
    assert sorted(tasks.ended_keys(conn, ["done", "queued", "running", "gone", "unknown"])) == [
        "done", "gone"]
    assert tasks.ended_keys(conn, []) == []
