"""The writer thread: a burst is one transaction, no SQL on the reactor, no signals taken."""
from __future__ import annotations

import signal
import threading
from types import SimpleNamespace

import pytest_twisted

from tests.fakes import exit_with
from tests.history.stores import Harness


@pytest_twisted.ensureDeferred
async def test_a_burst_of_tasks_is_written_in_a_transaction_or_two(harness):
    statements = []
    harness.store._database._connection.set_trace_callback(statements.append)
    for _ in range(50):
        harness.submit("true")
        exit_with(harness.spawn.protocol(), 0)
    assert len((await harness.store.list(limit=100)).records) == 50
    assert statements.count("COMMIT") <= 2


@pytest_twisted.ensureDeferred
async def test_database_work_never_runs_on_the_reactor_thread(harness):
    threads = []
    harness.store._database._connection.set_trace_callback(
        lambda sql: threads.append(threading.current_thread().name))
    t = harness.submit("true")
    exit_with(harness.spawn.protocol(), 0)
    await harness.store.get(t.id)
    assert threads and threading.main_thread().name not in threads


@pytest_twisted.ensureDeferred
async def test_the_store_thread_takes_no_signals(harness):
    """Every task's SIGCHLD interrupting its timed wait once stalled all writes for good."""
    await harness.store.get("0" * 32)  # the thread is up and serving
    thread = harness.store._database._thread
    with open(f"/proc/self/task/{thread.native_id}/status") as f:
        blocked = int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        assert blocked & (1 << (sig - 1)), sig


@pytest_twisted.ensureDeferred
async def test_a_running_task_is_recorded_with_the_identity_the_runner_reads(tmp_path):
    asked = []

    def identify(pid):
        asked.append(pid)
        return SimpleNamespace(start_time=4242, session=7)
    harness = Harness(tmp_path / "data", identify=identify)
    try:
        t = harness.submit("sleep", "60")
        await harness.store.get(t.id)
        row = await harness.store._database.run(lambda c: c.execute(
            "SELECT pid, proc_start, session FROM tasks WHERE id = ?", (t.id,)).fetchone())
        assert row == (harness.spawn.protocol().pid, 4242, 7)
        assert asked == [harness.spawn.protocol().pid]
    finally:
        await harness.store.close()


@pytest_twisted.ensureDeferred
async def test_a_task_queued_started_and_ended_within_the_delay_has_its_row_made_once(
        harness, monkeypatch):
    """A write is a function making the row, called when the writes are handed to the
    thread: the task as it is then, once, whatever it went through meanwhile."""
    from agent.history import store as store_module
    made = []
    real = store_module.row_of
    monkeypatch.setattr(store_module, "row_of", lambda *a: made.append(a[0].id) or real(*a))
    t = harness.submit("true")
    exit_with(harness.spawn.protocol(), 0)
    assert made == []  # queued, running and ended: nothing made yet
    record = await harness.store.get(t.id)  # a read hands the writes over first
    assert record.state == "succeeded" and made == [t.id]


@pytest_twisted.ensureDeferred
async def test_writes_not_yet_handed_over_are_seen_by_every_read(harness):
    t = harness.submit("sleep", "60")
    database = harness.store._database
    assert database.waiting == 1 and database.waiting_row(t.id)[3] == "running"
    assert [r.id for r in (await harness.store.list()).records] == [t.id]
    exit_with(harness.spawn.protocol(), 0)
    assert database.waiting_row(t.id)[3] == "succeeded"
    assert (await harness.store.get(t.id)).state == "succeeded"


@pytest_twisted.ensureDeferred
async def test_writes_are_handed_over_on_their_own_within_the_delay(harness):
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    from agent.history.writer import WRITE_DELAY
    t = harness.submit("true")
    exit_with(harness.spawn.protocol(), 0)
    await deferLater(reactor, WRITE_DELAY * 5, lambda: None)
    database = harness.store._database
    assert database._unmade == {}  # handed over without any read asking
    row = await database.run(lambda c: c.execute(
        "SELECT state FROM tasks WHERE id = ?", (t.id,)).fetchone())
    assert row == ("succeeded",)
