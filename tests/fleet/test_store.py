"""The fleet's SQL against a real PostgreSQL: the queue, the fence, leases, cancel, prune."""
from __future__ import annotations

import threading
import time

import psycopg
import pytest

from agent.fleet import nodes, schema, tasks
from agent.fleet.records import Report, Submission


@pytest.fixture
def conn(fleet_dsn):
    with psycopg.connect(fleet_dsn, autocommit=True) as connection:
        schema.migrate(connection)
        yield connection


def node(conn, name="n1", labels=None, lease=30.0, mine=None):
    return nodes.register(conn, name, labels or {}, 4, lease, None, mine).generation


def submit(conn, key, *command, **fields):
    return tasks.submit(conn, Submission(key, command or ("true",), **fields), "tester")


def test_migrating_twice_changes_nothing_and_says_what_it_found(conn):
    assert schema.migrate(conn) == schema.VERSION


def test_agents_starting_together_migrate_once(fleet_dsn):
    found, errors = [], []

    def start():
        try:
            with psycopg.connect(fleet_dsn, autocommit=True) as c:
                found.append(schema.migrate(c))
        except Exception as e:  # pragma: no cover - the failure is the assertion
            errors.append(e)
    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(found) == [0] + [schema.VERSION] * 7


def test_a_database_from_a_newer_agent_is_refused(conn):
    conn.execute("UPDATE agent_fleet_schema SET version = %s", (schema.VERSION + 1,))
    with pytest.raises(schema.SchemaTooNew, match="upgrade the agent"):
        schema.migrate(conn)


def test_a_known_key_with_the_same_command_attaches_and_another_command_is_refused(conn):
    first, created = submit(conn, "k", "echo", "hi")
    again, created_again = submit(conn, "k", "echo", "hi")
    assert (created, created_again) == (True, False)
    assert again.seq == first.seq
    with pytest.raises(tasks.FleetKeyConflict) as refused:
        submit(conn, "k", "rm", "-rf", "/")
    assert "echo" not in str(refused.value)


def test_claims_take_the_oldest_tasks_whose_labels_the_node_has(conn):
    generation = node(conn, labels={"os": "linux", "gpu": "a100"})
    submit(conn, "mac", labels=(("os", "mac"),))
    submit(conn, "any")
    submit(conn, "linux", labels=(("os", "linux"),))
    claimed = tasks.claim(conn, "n1", generation, {"os": "linux", "gpu": "a100"}, 10)
    assert [c.key for c in claimed] == ["any", "linux"]
    assert all(c.attempt == 1 for c in claimed)
    assert tasks.get(conn, "mac").state == "queued"


def test_two_nodes_claiming_at_once_never_get_the_same_task(fleet_dsn, conn):
    for i in range(200):
        submit(conn, f"t{i}")
    generations = {name: node(conn, name) for name in ("a", "b", "c", "d")}
    got: dict[str, list[str]] = {}

    def drain(name):
        with psycopg.connect(fleet_dsn, autocommit=True) as c:
            mine = got.setdefault(name, [])
            while batch := tasks.claim(c, name, generations[name], {}, 3):
                mine.extend(claim.key for claim in batch)
    threads = [threading.Thread(target=drain, args=(name,)) for name in generations]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [key for keys in got.values() for key in keys]
    assert sorted(everything) == sorted(f"t{i}" for i in range(200))
    assert len(set(everything)) == 200


def test_a_node_without_a_valid_lease_claims_nothing(conn):
    generation = node(conn, lease=0.05)
    submit(conn, "k")
    time.sleep(0.1)
    assert tasks.claim(conn, "n1", generation, {}, 1) == []


def test_a_result_is_recorded_once_and_a_retry_of_it_is_recognised(conn):
    generation = node(conn)
    submit(conn, "k", "echo")
    tasks.claim(conn, "n1", generation, {}, 1)
    result = Report("exited", 0, stdout_tail=b"hi\n", stdout_bytes=3, local_task_id="abc")
    assert tasks.report(conn, "k", 1, "n1", generation, result) == "recorded"
    assert tasks.report(conn, "k", 1, "n1", generation, result) == "already"
    task = tasks.get(conn, "k")
    assert (task.state, task.exit_code, task.stdout_tail, task.local_task_id) == (
        "finished", 0, b"hi\n", "abc")
    assert [(a.attempt, a.node_id, a.ending) for a in task.attempts] == [(1, "n1", "exited")]


def test_a_late_result_from_a_stale_attempt_is_refused(conn):
    old = node(conn, "slow", lease=0.2)
    submit(conn, "k")
    tasks.claim(conn, "slow", old, {}, 1)
    time.sleep(0.3)
    assert nodes.declare_dead(conn) == ["slow"]
    assert tasks.requeue_abandoned(conn) == [("k", "queued")]
    fresh = node(conn, "fast")
    [claim] = tasks.claim(conn, "fast", fresh, {}, 1)
    assert claim.attempt == 2
    assert tasks.report(conn, "k", 1, "slow", old, Report("exited", 0)) == "stale"
    assert tasks.report(conn, "k", 2, "fast", fresh, Report("exited", 7)) == "recorded"
    task = tasks.get(conn, "k")
    assert (task.state, task.exit_code, task.node_id) == ("finished", 7, "fast")
    assert [(a.node_id, a.ending) for a in task.attempts] == [("slow", "abandoned"),
                                                              ("fast", "exited")]


def test_a_result_after_the_lease_ran_out_is_refused_even_before_the_reaper_comes(conn):
    generation = node(conn, lease=0.1)
    submit(conn, "k")
    tasks.claim(conn, "n1", generation, {}, 1)
    time.sleep(0.2)
    assert tasks.report(conn, "k", 1, "n1", generation, Report("exited", 0)) == "stale"


def test_a_long_task_is_never_requeued_while_its_node_renews_its_lease(conn):
    generation = node(conn, lease=0.3)
    submit(conn, "long")
    tasks.claim(conn, "n1", generation, {}, 1)
    for _ in range(6):  # 0.6 s: twice the lease
        time.sleep(0.1)
        assert nodes.heartbeat(conn, "n1", generation, 0.3, 1)
        nodes.declare_dead(conn)
        assert tasks.requeue_abandoned(conn) == []
    assert tasks.get(conn, "long").state == "running"


def test_a_task_whose_nodes_keep_dying_is_lost_after_max_attempts(conn):
    submit(conn, "k", max_attempts=2)
    states = []
    for attempt in (1, 2):
        generation = node(conn, f"n{attempt}", lease=0.05)
        tasks.claim(conn, f"n{attempt}", generation, {}, 1)
        time.sleep(0.1)
        nodes.declare_dead(conn)
        states += tasks.requeue_abandoned(conn)
    assert states == [("k", "queued"), ("k", "lost")]
    task = tasks.get(conn, "k")
    assert (task.state, task.ending, task.attempt) == ("lost", "lost", 2)
    assert "started 2 time(s)" in task.error


def test_a_claim_released_unstarted_costs_no_attempt(conn):
    generation = node(conn)
    submit(conn, "k")
    tasks.claim(conn, "n1", generation, {}, 1)
    assert tasks.release(conn, "k", 1, "n1")
    task = tasks.get(conn, "k")
    assert (task.state, task.attempt, task.attempts) == ("queued", 0, ())
    assert tasks.claim(conn, "n1", generation, {}, 1)[0].attempt == 1


def test_a_drained_attempt_goes_back_to_the_queue(conn):
    generation = node(conn)
    submit(conn, "k")
    tasks.claim(conn, "n1", generation, {}, 1)
    assert tasks.give_back(conn, "k", 1, "n1", generation, "drained") == "queued"
    assert tasks.give_back(conn, "k", 1, "n1", generation, "drained") == "stale"
    assert tasks.get(conn, "k").attempts[0].why == "drained"


def test_cancel_ends_a_queued_task_at_once_and_flags_a_running_one(conn):
    generation = node(conn)
    submit(conn, "running")
    tasks.claim(conn, "n1", generation, {}, 1)
    submit(conn, "queued")
    assert tasks.cancel(conn, "queued").state == "cancelled"
    assert tasks.cancel(conn, "running").state == "running"
    assert tasks.cancel_requested(conn, "n1", generation) == ["running"]
    assert tasks.report(conn, "running", 1, "n1", generation,
                        Report("cancelled", -1, cancelled=True)) == "recorded"
    assert tasks.get(conn, "running").state == "cancelled"
    assert tasks.cancel(conn, "nothing") is None


def test_cancel_notifies_the_nodes_and_an_end_notifies_the_submitters(fleet_dsn, conn):
    with psycopg.connect(fleet_dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {tasks.CANCEL}")
        listener.execute(f"LISTEN {tasks.ENDED}")
        generation = node(conn)
        submit(conn, "k")
        tasks.claim(conn, "n1", generation, {}, 1)
        tasks.cancel(conn, "k")
        tasks.report(conn, "k", 1, "n1", generation, Report("cancelled", -1, cancelled=True))
        heard = [(n.channel, n.payload) for n in listener.notifies(timeout=1.0, stop_after=2)]
    assert heard == [(tasks.CANCEL, "k"), (tasks.ENDED, "k")]


def test_a_node_id_held_by_a_live_lease_is_refused_unless_it_is_our_own(conn):
    generation = node(conn, "n1")
    with pytest.raises(nodes.NodeIdInUse, match="another --node-id"):
        node(conn, "n1")
    assert node(conn, "n1", mine=generation) > generation  # our own previous run


def test_a_new_generation_fences_the_old_ones_heartbeat(conn):
    old = node(conn)
    node(conn, mine=old)
    assert not nodes.heartbeat(conn, "n1", old, 30.0, 0)


def test_prune_removes_what_ended_long_enough_ago_and_nothing_running(conn):
    generation = node(conn)
    submit(conn, "old")
    submit(conn, "running")
    tasks.claim(conn, "n1", generation, {}, 2)
    tasks.report(conn, "old", 1, "n1", generation, Report("exited", 0))
    conn.execute("UPDATE agent_fleet_tasks SET ended_at = now() - interval '2 days' "
                 "WHERE key = 'old'")
    assert tasks.prune(conn, keep_days=1) == 1
    assert tasks.get(conn, "old") is None
    assert tasks.get(conn, "running").state == "running"
    assert conn.execute("SELECT count(*) FROM agent_fleet_attempts WHERE key = 'old'"
                        ).fetchone()[0] == 0


def test_a_listing_without_tails_leaves_them_out_and_keeps_the_counts(conn):
    generation = node(conn)
    submit(conn, "k")
    [claim] = tasks.claim(conn, "n1", generation, {}, 1)
    tasks.report(conn, "k", claim.attempt, "n1", generation,
                 Report("exited", 0, stdout_tail=b"out", stdout_bytes=3))
    [bare] = tasks.list_tasks(conn, tails=False)
    [whole] = tasks.list_tasks(conn)
    assert (bare.stdout_tail, bare.stdout_bytes) == (None, 3)
    assert whole.stdout_tail == b"out"
    assert bare == whole.__class__(**{**whole.__dict__, "stdout_tail": None,
                                      "stderr_tail": None})


def test_one_node_is_read_by_its_id_and_its_age_by_the_databases_clock(conn):
    node(conn, "n1")
    found = nodes.get(conn, "n1")
    assert found.node_id == "n1" and nodes.get(conn, "n2") is None
    assert nodes.database_now(conn) >= found.heartbeat_at
