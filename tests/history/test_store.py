"""The history: every engine task recorded off the reactor thread, readable at once, kept across restarts."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading

import pytest
import pytest_twisted

from agent.core.engine import Lane
from agent.doors.tcp.wire import TaskRequest
from agent.runner.process import StdoutCollector
from agent.runner.procinfo import ProcStat, is_still_the_task, proc_stat
from agent.history.recovery import LOST_QUEUED, LOST_RUNNING
from agent.history.store import DataDirInUse
from tests.fakes import FakeHost, exit_with
from tests.history.stores import new_store
from tests.procs import group_members, wait_until_empty


class Harness:
    """An engine on a Clock with fake children (tests.fakes.FakeHost), feeding a real Store."""

    def __init__(self, data_dir, max_log_bytes=1 << 20):
        host = FakeHost()
        host.clock.advance(1_700_000_000)
        self.host = host
        self.clock, self.spawn, self.engine = host.clock, host.spawn, host.engine
        self.store = new_store(data_dir, max_log_bytes).open()
        self.engine.observers.append(self.store.observe)
        self.engine.cleanup_observers.append(self.store.observe_cleanup)
        self.engine.output_taps.append(self.store.tap)
        self.store.start()

    def submit(self, *argv, lane=None, timeout=None, source="http"):
        return self.engine.submit(TaskRequest(tuple(argv), timeout), lane or Lane(0),
                                  StdoutCollector(), source=source)


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path / "data")
    yield h
    if h.store._database._thread.is_alive():
        pytest_twisted.blockon(h.store.close())


@pytest_twisted.ensureDeferred
async def test_a_task_is_readable_as_soon_as_the_engine_reports_it(harness):
    t = harness.submit("sleep", "60")
    record = await harness.store.get(t.id)
    assert (record.state, record.command, record.source) == ("running", ("sleep", "60"), "http")
    assert record.pid == harness.spawn.protocol().pid
    page = await harness.store.list()
    assert [r.id for r in page.records] == [t.id]


@pytest_twisted.ensureDeferred
async def test_an_ended_task_carries_its_outcome(harness):
    t = harness.submit("false")
    harness.clock.advance(0.5)
    exit_with(harness.spawn.protocol(), 3)
    record = await harness.store.get(t.id)
    assert (record.state, record.exit_code, record.error) == ("failed", 3, "")
    assert record.duration_ms == 500
    assert record.finished_at == pytest.approx(record.started_at + 0.5)


@pytest_twisted.ensureDeferred
async def test_each_ending_maps_to_its_state(harness):
    ok = harness.submit("true")
    exit_with(harness.spawn.protocol(), 0)
    timed = harness.submit("sleep", timeout=1)
    harness.clock.advance(1)
    cancelled = harness.submit("sleep")
    cancelled.cancel("cancelled by request")
    harness.spawn.fail_with = FileNotFoundError(2, "No such file or directory")
    unstartable = harness.submit("nope")
    got = {name: await harness.store.get(t.id) for name, t in
           [("ok", ok), ("timed", timed), ("cancelled", cancelled), ("unstartable", unstartable)]}
    assert got["ok"].state == "succeeded"
    assert (got["timed"].state, got["timed"].exit_code, got["timed"].error) == \
        ("timed_out", -1, "timeout exceeded")
    assert (got["cancelled"].state, got["cancelled"].error) == ("cancelled", "cancelled by request")
    assert (got["unstartable"].state, got["unstartable"].exit_code) == ("failed", -1)
    assert "No such file" in got["unstartable"].error
    assert got["unstartable"].started_at is None and got["unstartable"].pid is None


@pytest_twisted.ensureDeferred
async def test_a_task_dropped_from_the_queue_is_cancelled_and_never_started(harness):
    lane = Lane(1, queue=True)
    harness.submit("a", lane=lane)
    queued = harness.submit("b", lane=lane)
    assert (await harness.store.get(queued.id)).state == "queued"
    queued.cancel("client disconnected")
    record = await harness.store.get(queued.id)
    assert (record.state, record.started_at, record.error) == ("cancelled", None,
                                                               "cancelled before it started")


@pytest_twisted.ensureDeferred
async def test_a_running_task_shows_its_byte_counts_as_they_grow(harness):
    t = harness.submit("cat")
    harness.spawn.protocol().childDataReceived(1, b"12345")
    harness.spawn.protocol().childDataReceived(2, b"67")
    record = await harness.store.get(t.id)
    assert (record.stdout_bytes, record.stderr_bytes) == (5, 2)
    assert (await harness.store.list()).records[0].stdout_bytes == 5


@pytest_twisted.ensureDeferred
async def test_the_record_says_why_the_task_ended_and_whether_its_group_was_emptied(harness):
    ok = harness.submit("true")
    exit_with(harness.spawn.protocol(), 0)
    killed = harness.submit("sleep")
    exit_with(harness.spawn.protocol(), signal=15)
    timed = harness.submit("sleep", timeout=1)
    harness.kills_survivor = harness.spawn.protocol().pid
    harness.host.kills.survivors.add(harness.kills_survivor)
    harness.clock.advance(1)
    got = {name: await harness.store.get(t.id) for name, t in
           [("ok", ok), ("killed", killed), ("timed", timed)]}
    assert (got["ok"].reason, got["ok"].signal, got["ok"].cleanup) == ("exited", None, "complete")
    assert (got["killed"].reason, got["killed"].signal) == ("signalled", 15)
    assert (got["timed"].reason, got["timed"].cleanup) == ("timeout", None)
    harness.clock.pump([0.05] * 120)  # the group outlives the cleanup deadline
    assert (await harness.store.get(timed.id)).cleanup == "incomplete"
    assert harness.store._ended_rows == {}


@pytest_twisted.ensureDeferred
async def test_a_history_from_an_older_agent_gains_the_new_columns(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    old = sqlite3.connect(data / "history.sqlite3")
    old.executescript(
        "CREATE TABLE tasks (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
        "source TEXT NOT NULL, command TEXT NOT NULL, state TEXT NOT NULL, "
        "created_at REAL NOT NULL, started_at REAL, finished_at REAL, duration_ms REAL, "
        "exit_code INTEGER, error TEXT, pid INTEGER, stdout_bytes INTEGER NOT NULL, "
        "stderr_bytes INTEGER NOT NULL, stdout_dropped INTEGER NOT NULL, "
        "stderr_dropped INTEGER NOT NULL, timeout REAL, request_id TEXT, proc_start INTEGER, "
        "session INTEGER);"
        "INSERT INTO tasks (id, source, command, state, created_at, exit_code, error, "
        "stdout_bytes, stderr_bytes, stdout_dropped, stderr_dropped) VALUES "
        "('" + "a" * 32 + "', 'tcp', '[\"true\"]', 'succeeded', 1.0, 0, '', 0, 0, 0, 0);")
    old.commit()
    old.close()
    store = new_store(data).open()
    store.start()
    try:
        record = await store.get("a" * 32)
    finally:
        await store.close()
    assert (record.state, record.reason, record.cleanup) == ("succeeded", None, None)


@pytest_twisted.ensureDeferred
async def test_news_after_the_end_changes_nothing_and_leaks_nothing(harness):
    t = harness.submit("echo")
    harness.spawn.protocol().childDataReceived(1, b"abc")
    exit_with(harness.spawn.protocol(), 0)
    harness.store.observe(t)  # as the engine does once the task's group is found empty
    record = await harness.store.get(t.id)
    assert (record.state, record.stdout_bytes) == ("succeeded", 3)
    assert harness.store._live == {}


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
async def test_history_is_newest_first_in_pages_that_chain(harness):
    ids = []
    for i in range(5):
        ids.append(harness.submit("true", str(i)).id)
        exit_with(harness.spawn.protocol(), 0)
    first = await harness.store.list(limit=2)
    second = await harness.store.list(limit=2, cursor=first.next)
    third = await harness.store.list(limit=2, cursor=second.next)
    assert [r.id for r in first.records + second.records + third.records] == ids[::-1]
    assert third.next is None


@pytest_twisted.ensureDeferred
async def test_history_filters_by_state(harness):
    running = harness.submit("sleep")
    harness.submit("true")
    exit_with(harness.spawn.protocol(), 0)
    page = await harness.store.list(state="running")
    assert [r.id for r in page.records] == [running.id]


def test_a_cursor_not_from_the_api_is_refused(harness):
    with pytest.raises(ValueError):
        harness.store.list(cursor="abc")


@pytest_twisted.ensureDeferred
async def test_unknown_or_malformed_ids_are_none(harness):
    assert await harness.store.get("0" * 32) is None
    assert await harness.store.get("../../etc/passwd") is None


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
async def test_close_writes_what_is_pending_and_history_survives_a_restart(tmp_path):
    first = Harness(tmp_path / "data")
    t = first.submit("echo", "hi")
    first.spawn.protocol().childDataReceived(1, b"hi\n")
    exit_with(first.spawn.protocol(), 0)
    await first.store.close()
    second = Harness(tmp_path / "data")
    record = await second.store.get(t.id)
    assert (record.state, record.command, record.stdout_bytes) == ("succeeded", ("echo", "hi"), 3)
    assert second.store.recovered == []
    await second.store.close()


@pytest_twisted.ensureDeferred
async def test_tasks_live_when_the_agent_died_are_lost_on_the_next_start(tmp_path):
    first = Harness(tmp_path / "data")
    lane = Lane(1, queue=True)
    running = first.submit("sleep", lane=lane)
    queued = first.submit("sleep", lane=lane)
    first.spawn.protocol().childDataReceived(1, b"partial")
    await first.store.get(running.id)  # on disk, as an agent killed with -9 would leave it
    await first.store._database.close()  # as the OS closes its files when it is killed: no
    os.close(first.store._lock_fd)       # record of what happened after this moment
    second = Harness(tmp_path / "data")
    assert sorted(second.store.recovered) == sorted([running.id, queued.id])
    lost_running, lost_queued = await second.store.get(running.id), await second.store.get(queued.id)
    assert (lost_running.state, lost_running.exit_code, lost_running.error) == ("lost", -1, LOST_RUNNING)
    assert (lost_running.reason, lost_queued.reason) == ("lost", "lost")
    assert lost_running.stdout_bytes == 7
    assert (lost_queued.state, lost_queued.error) == ("lost", LOST_QUEUED)
    await second.store.close()


def test_a_second_agent_cannot_share_a_data_dir(harness, tmp_path):
    with pytest.raises(DataDirInUse):
        new_store(tmp_path / "data").open()


def _create_history(data_dir):
    """The schema on disk and no agent holding it, as after a crash."""
    store = new_store(data_dir).open()
    store._database._connection.close()
    os.close(store._lock_fd)


@pytest_twisted.ensureDeferred
async def test_output_no_record_points_to_is_removed_at_start(tmp_path):
    data = tmp_path / "d"
    _create_history(data)
    _insert_running(data, None, None, None)  # a task with a record ("a" * 32)
    for name in ("a" * 32, "b" * 32, "not-a-task"):
        (data / "output" / name).mkdir(parents=True)
        (data / "output" / name / "1").write_bytes(b"x" * 100)
    store = new_store(data).open()  # after a run that did not stop cleanly
    store.start()
    await store.close()
    assert sorted(p.name for p in (data / "output").iterdir()) == ["a" * 32, "not-a-task"]
    (data / "output" / ("c" * 32)).mkdir()
    store = new_store(data).open()  # after a clean stop: no sweep, nothing to find
    store.start()
    await store.close()
    assert ("c" * 32) in {p.name for p in (data / "output").iterdir()}


def _sleeper_group():
    return subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60"], process_group=0)


def _insert_running(data_dir, pid, proc_start, session):
    with sqlite3.connect(data_dir / "history.sqlite3") as db:
        db.execute("INSERT INTO tasks (id, source, command, state, created_at, pid, proc_start, "
                   "session, stdout_bytes, stderr_bytes, stdout_dropped, stderr_dropped) "
                   "VALUES (?, 'http', '[\"sleep\"]', 'running', 0, ?, ?, ?, 0, 0, 0, 0)",
                   ("a" * 32, pid, proc_start, session))


@pytest_twisted.ensureDeferred
async def test_recovery_kills_the_group_a_lost_task_left_behind(tmp_path):
    _create_history(tmp_path / "d")
    proc = _sleeper_group()
    try:
        stat = proc_stat(proc.pid)
        _insert_running(tmp_path / "d", proc.pid, stat.start_time, stat.session)
        store = new_store(tmp_path / "d").open()
        assert not wait_until_empty(group_members, proc.pid)
        assert proc.wait(5) == -signal.SIGKILL
        store.start()
        await store.close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest_twisted.ensureDeferred
async def test_recovery_spares_a_process_that_reused_the_pid(tmp_path):
    _create_history(tmp_path / "d")
    proc = _sleeper_group()
    try:
        stat = proc_stat(proc.pid)
        _insert_running(tmp_path / "d", proc.pid, stat.start_time - 1, stat.session)
        store = new_store(tmp_path / "d").open()
        assert proc.poll() is None and len(group_members(proc.pid)) >= 2
        store.start()
        await store.close()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _stat(pid, pgrp, start, session=7, zombie=False):
    return ProcStat(pid, pgrp, session, start, zombie)


def test_pid_reuse_guard_with_the_leader_alive():
    assert is_still_the_task([_stat(10, 10, 500)], 10, 500, 7)
    assert not is_still_the_task([_stat(10, 10, 900)], 10, 500, 7)
    assert not is_still_the_task([_stat(10, 10, 500, session=8)], 10, 500, 7)


def test_pid_reuse_guard_with_only_descendants_left():
    assert is_still_the_task([_stat(11, 10, 600), _stat(12, 10, 700)], 10, 500, 7)
    assert not is_still_the_task([_stat(11, 10, 400)], 10, 500, 7)
    assert not is_still_the_task([_stat(11, 10, 600, session=9)], 10, 500, 7)
    assert not is_still_the_task([], 10, 500, 7)
