"""agent-scheduler --fleet's submitter against a real PostgreSQL, with a fake node thread
(tests/clients/fleetnode.py) running the tasks: results while it waits, --no-wait, a key
conflict, two submitters of one batch, and PostgreSQL restarting during the wait."""
from __future__ import annotations

import io
import json

import psycopg
import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from agent.clients import fleet_submit
from agent.clients.fleet_submit import Entry, Submitter, connection_dsn
from agent.fleet import schema, tasks
from agent.fleet.database import Database, Listener
from agent.fleet.records import Submission
from tests.clients.fleetnode import FakeNode

WAIT = 60.0  # bound on any one run; they take well under a second (the restart: a few)


def batch(n: int, prefix: str = "job") -> list[Entry]:
    return [Entry(f"line {i + 1}", Submission(f"{prefix}-{i}", ("echo", f"hello {i}")))
            for i in range(n)]


class Submitting:
    """A Submitter on the real reactor with its own connection and listener."""

    def __init__(self, dsn: str, poll: float = fleet_submit.POLL):
        dsn = connection_dsn(dsn)
        self.db = Database(reactor, dsn, "submit")
        self.out = io.BytesIO()
        self.err = io.StringIO()
        self.submitter = Submitter(
            reactor, self.db,
            lambda received, again: Listener(reactor, dsn, (tasks.ENDED,), received, again),
            submitted_by="test", where="test db", out=self.out, err=self.err, poll=poll)

    def run(self, entries) -> Deferred:
        d = Deferred.fromCoroutine(self.submitter.run(entries))
        return d.addTimeout(WAIT, reactor).addBoth(self._closed)

    def submit_only(self, entries) -> Deferred:
        d = Deferred.fromCoroutine(self.submitter.submit_only(entries))
        return d.addTimeout(WAIT, reactor).addBoth(self._closed)

    def _closed(self, result):
        return self.db.close().addCallback(lambda _: result)

    def results(self) -> list[dict]:
        return [json.loads(line) for line in self.out.getvalue().splitlines()]


@pytest.fixture
def dsn(fleet_dsn):
    with psycopg.connect(fleet_dsn, autocommit=True) as conn:
        schema.migrate(conn)
    return fleet_dsn


@pytest.fixture
def node(dsn):
    nodes = []

    def start(**kw) -> FakeNode:
        nodes.append(FakeNode(dsn, **kw).start())
        return nodes[-1]
    yield start
    for each in nodes:
        each.stop()


async def until(predicate, timeout: float = WAIT, what: str = "condition"):
    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError(f"{what} never happened within {timeout} s")
        await deferLater(reactor, 0.05, lambda: None)
        waited += 0.05


def stored(dsn: str) -> dict[str, tuple]:
    with psycopg.connect(dsn) as conn:
        return {key: (state, attempt) for key, state, attempt in conn.execute(
            "SELECT key, state, attempt FROM agent_fleet_tasks")}


@pytest_twisted.ensureDeferred
async def test_every_result_is_printed_once_while_a_node_runs_the_batch(dsn, node, monkeypatch):
    monkeypatch.setattr(fleet_submit, "SUBMIT_BATCH", 40)  # several transactions
    monkeypatch.setattr(fleet_submit, "FETCH_BATCH", 15)
    run = Submitting(dsn)
    worker = node()
    await run.run(batch(100))
    results = run.results()
    assert sorted(r["id"] for r in results) == sorted(f"job-{i}" for i in range(100))
    for r in results:
        number = r["id"].split("-")[1]
        assert r["output"] == f"hello {number}\n"
        assert (r["exit_code"], r["error"], r["state"], r["node_id"]) == (0, "", "finished",
                                                                       "fake-node")
    assert set(worker.runs.values()) == {1}
    summary = run.submitter.summary
    assert (summary.sent, summary.ok, summary.missing) == (100, 100, 0)


@pytest_twisted.ensureDeferred
async def test_no_wait_queues_the_batch_and_a_later_wait_attaches_to_it(dsn, node):
    first = Submitting(dsn)
    await first.submit_only(batch(10))
    assert first.out.getvalue().decode().split() == [f"job-{i}" for i in range(10)]
    assert {state for state, _ in stored(dsn).values()} == {"queued"}
    node()
    later = Submitting(dsn)
    await later.run(batch(10))
    assert len(later.results()) == 10 and later.submitter.summary.attached == 10
    assert {state for state, _ in stored(dsn).values()} == {"finished"}


@pytest_twisted.ensureDeferred
async def test_a_key_taken_by_another_command_is_a_refused_result_and_the_rest_runs(dsn, node):
    with psycopg.connect(dsn, autocommit=True) as conn:
        tasks.submit(conn, Submission("job-1", ("echo", "someone else's")), "other")
    node()
    run = Submitting(dsn)
    await run.run(batch(3))
    by_key = {r["id"]: r for r in run.results()}
    assert by_key["job-1"] == {"command": ["echo", "hello 1"], "exit_code": -1, "id": "job-1",
                               "state": "refused",
                               "error": "key 'job-1' is already used by another command"}
    assert by_key["job-0"]["output"] == "hello 0\n" and by_key["job-2"]["output"] == "hello 2\n"
    assert run.results()[0]["id"] == "job-1"  # refused as its batch is answered
    assert (run.submitter.summary.ok, run.submitter.summary.failed) == (2, 1)


@pytest_twisted.ensureDeferred
async def test_two_submitters_of_one_batch_get_the_same_results_and_each_task_runs_once(
        dsn, node):
    worker = node(budget=0)  # both submit before anything runs
    one, two = Submitting(dsn), Submitting(dsn)
    runs = [one.run(batch(60)), two.run(batch(60))]
    await until(lambda: len(stored(dsn)) == 60 and one.submitter.summary.sent == 60
                == two.submitter.summary.sent, what="both submitted")
    worker.allow(None)
    for d in runs:
        await d
    assert sorted(one.out.getvalue().splitlines()) == sorted(two.out.getvalue().splitlines())
    assert len(one.results()) == 60
    assert set(worker.runs.values()) == {1} and len(worker.runs) == 60
    assert set(stored(dsn).values()) == {("finished", 1)}
    assert one.submitter.summary.attached + two.submitter.summary.attached == 60


@pytest_twisted.ensureDeferred
async def test_postgresql_restarting_during_the_wait_loses_and_duplicates_nothing(
        dsn, node, postgres_server):
    worker = node(budget=20)
    run = Submitting(dsn, poll=0.3)
    done = run.run(batch(50))
    await until(lambda: len(run.results()) == 20, what="the first 20 results")
    await threads.deferToThread(postgres_server.restart)
    worker.allow(None)
    await done
    results = run.results()
    assert sorted(r["id"] for r in results) == sorted(f"job-{i}" for i in range(50))
    assert all(r["output"] == f"hello {r['id'].split('-')[1]}\n" for r in results)
    assert set(worker.runs.values()) == {1} and worker.reconnects >= 1
    said = run.err.getvalue()
    assert "the fleet database is unreachable" in said
    assert "the fleet database is back after" in said
    assert "listening again" in said
