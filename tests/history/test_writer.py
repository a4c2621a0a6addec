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
