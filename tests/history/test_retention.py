"""Retention: --keep-days and --keep-bytes prune the oldest ended tasks, never a live one."""
from __future__ import annotations

import os
import sqlite3

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.logger import Logger, formatEvent
from twisted.python import usage

from agent.history import retention
from agent.core.lanes import Lane
from agent.history.retention import PRUNE_INTERVAL, Policy, Retention, parse_size, SIZE_CHECK_DELAY
from agent.service import Options
from agent.history.store import StillRunning
from tests.fakes import exit_with

DAY = 86400.0


def finished(harness, output: bytes = b"", code: int = 0):
    """A task that wrote `output` to stdout and exited."""
    task = harness.submit("echo")
    if output:
        harness.spawn.protocol().childDataReceived(1, output)
    exit_with(harness.spawn.protocol(), code)
    return task


def output_dir(harness, task) -> str:
    return harness.store.output_dir(task.id)


@pytest.fixture
def logged(monkeypatch):
    """What agent.history.retention logs, as text."""
    events = []
    monkeypatch.setattr(retention, "log", Logger(observer=events.append))
    return events


def texts(events, level=None) -> list[str]:
    return [formatEvent(e) for e in events if level is None or e["log_level"].name == level]


# -- by age

@pytest_twisted.ensureDeferred
async def test_prune_by_age_removes_tasks_ended_before_keep_days_and_their_output(harness, logged):
    old = finished(harness, b"old output\n")
    harness.clock.advance(2 * DAY)
    recent = finished(harness, b"recent output\n")
    assert os.path.isdir(output_dir(harness, old))
    pruned = await Retention(harness.store, Policy(keep_days=1, keep_bytes=0),
                             harness.clock).prune()
    assert (pruned.by_age, pruned.by_size) == (1, 0)
    assert await harness.store.get(old.id) is None
    assert not os.path.exists(output_dir(harness, old))
    assert (await harness.store.get(recent.id)).state == "succeeded"
    assert os.path.isdir(output_dir(harness, recent))
    assert pruned.freed_bytes >= len(b"old output\n")


@pytest_twisted.ensureDeferred
async def test_age_counts_from_the_end_of_a_task_not_its_start(harness):
    long_one = harness.submit("sleep")
    harness.clock.advance(3 * DAY)
    exit_with(harness.spawn.protocol(), 0)
    pruned = await Retention(harness.store, Policy(keep_days=1, keep_bytes=0),
                             harness.clock).prune()
    assert pruned.tasks == 0
    assert (await harness.store.get(long_one.id)).state == "succeeded"


# -- by size

@pytest_twisted.ensureDeferred
async def test_prune_by_size_removes_the_oldest_first_and_stops_once_under(harness):
    tasks = [finished(harness, b"x" * 200_000) for _ in range(5)]
    await harness.store.compact()
    before = await harness.store.usage()
    assert before.output_bytes == 5 * 200_000
    limit = before.total - 300_000  # two tasks' output must go, and two are enough
    pruned = await Retention(harness.store, Policy(keep_days=0, keep_bytes=limit),
                             harness.clock).prune()
    kept = [t for t in tasks if await harness.store.get(t.id) is not None]
    assert kept == tasks[2:]
    assert [os.path.exists(output_dir(harness, t)) for t in tasks] == [False] * 2 + [True] * 3
    assert (pruned.by_size, pruned.size_unmet) == (2, False)
    assert pruned.usage.total <= limit
    assert pruned.freed_bytes >= 400_000


@pytest_twisted.ensureDeferred
async def test_under_the_size_limit_nothing_is_pruned(harness, logged):
    tasks = [finished(harness, b"y" * 1000) for _ in range(3)]
    pruned = await Retention(harness.store, Policy(keep_days=0, keep_bytes=1 << 30),
                             harness.clock).prune()
    assert pruned.tasks == 0
    assert all([await harness.store.get(t.id) for t in tasks])
    assert texts(logged) == [], "a prune that removed nothing says nothing"


@pytest_twisted.ensureDeferred
async def test_live_tasks_are_never_pruned_and_an_unmeetable_limit_is_logged_once(harness, logged):
    ended = finished(harness, b"z" * 5000)
    lane = Lane(1, queue=True)
    running = harness.submit("sleep", lane=lane)
    harness.spawn.protocol().childDataReceived(1, b"running output\n")
    queued = harness.submit("sleep", lane=lane)
    just_ended = harness.submit("sleep")
    harness.host.kills.survivors.add(harness.spawn.protocol().pid)  # its cleanup still going on
    exit_with(harness.spawn.protocol(), 0)
    looked = []
    real_ended_tasks = harness.store.ended_tasks
    harness.store.ended_tasks = lambda *a, **k: looked.append(a) or real_ended_tasks(*a, **k)

    keeper = Retention(harness.store, Policy(keep_days=0, keep_bytes=1), harness.clock)
    first = await keeper._prune_logging_errors()
    second = await keeper._prune_logging_errors()

    assert await harness.store.get(ended.id) is None
    for task in (running, queued, just_ended):
        assert await harness.store.get(task.id) is not None, task.id
    assert os.path.isdir(output_dir(harness, running))
    assert (first.by_size, first.size_unmet, second.tasks, second.size_unmet) == (1, True, 0, True)
    assert len(looked) <= 4, "a limit that cannot be met ends the prune, it does not loop"
    warnings = texts(logged, "warn")
    assert len(warnings) == 1 and "over --keep-bytes 1" in warnings[0]
    assert len(texts(logged, "info")) == 1


@pytest_twisted.ensureDeferred
async def test_the_prune_log_line_says_how_many_how_much_and_why(harness, logged):
    finished(harness, b"a" * 3000)
    harness.clock.advance(2 * DAY)
    finished(harness, b"b" * 3000)
    finished(harness, b"c" * 3000)
    await Retention(harness.store, Policy(keep_days=1, keep_bytes=1), harness.clock) \
        ._prune_logging_errors()
    [line] = texts(logged, "info")
    assert "pruned 3 task(s)" in line and "by age and size" in line
    assert "(1 older than --keep-days, 2 over --keep-bytes)" in line
    [event] = [e for e in logged if e["log_level"].name == "info"]
    assert event["tasks"] == 3 and event["freed_bytes"] >= 9000


@pytest_twisted.ensureDeferred
async def test_a_failing_prune_is_logged_and_the_next_one_still_comes(harness, logged):
    keeper = Retention(harness.store, Policy(keep_days=1, keep_bytes=0), harness.clock)
    calls = []

    def broken():
        calls.append(1)
        raise sqlite3.OperationalError("disk I/O error")
    harness.store.compact = broken
    keeper.startService()
    harness.clock.advance(PRUNE_INTERVAL)
    assert len(calls) == 2
    assert len(texts(logged, "critical")) == 2
    await keeper.stopService()


# -- hourly

@pytest_twisted.ensureDeferred
async def test_the_hourly_prune_fires_when_the_clock_advances_an_hour(harness):
    task = finished(harness, b"out\n")
    keeper = Retention(harness.store, Policy(keep_days=0.5 / 24, keep_bytes=0), harness.clock)
    keeper.startService()  # the prune at start: the task is too young to go
    await keeper.idle()
    assert await harness.store.get(task.id) is not None
    harness.clock.advance(PRUNE_INTERVAL - 1)
    await keeper.idle()
    assert await harness.store.get(task.id) is not None
    harness.clock.advance(1)
    await keeper.idle()
    assert await harness.store.get(task.id) is None
    await keeper.stopService()
    assert harness.clock.getDelayedCalls() == [], "stopping leaves no timer behind"


@pytest_twisted.ensureDeferred
async def test_stopping_during_a_prune_lets_the_store_close(harness):
    for _ in range(5):
        finished(harness, b"o" * 100)
    keeper = Retention(harness.store, Policy(keep_days=0, keep_bytes=1), harness.clock)
    keeper.startService()  # the prune at start is waiting for the store thread
    assert keeper._current is not None
    stopped = gatherResults([keeper.stopService(), harness.store.close()])
    await stopped.addTimeout(10, reactor)  # a job asked for after the close would never answer
    assert keeper._current is None


def test_without_limits_nothing_is_scheduled(harness):
    keeper = Retention(harness.store, Policy(keep_days=0, keep_bytes=0), harness.clock)
    keeper.startService()
    assert harness.clock.getDelayedCalls() == []
    keeper.stopService()


# -- purge

@pytest_twisted.ensureDeferred
async def test_purge_removes_an_ended_task_and_its_output_and_says_so_after_the_commit(harness):
    task = finished(harness, b"bye\n")
    forgotten = []

    def on_forgotten(ids):
        with sqlite3.connect(harness.store._data_dir / "history.sqlite3") as other:
            left = other.execute("SELECT COUNT(*) FROM tasks WHERE id = ?", (task.id,)).fetchone()
        forgotten.append((ids, left[0]))
    harness.store._forgotten = on_forgotten
    record = await harness.store.purge(task.id)
    assert (record.id, record.state, record.stdout_bytes) == (task.id, "succeeded", 4)
    assert forgotten == [([task.id], 0)], "called once the deletion is committed"
    assert await harness.store.get(task.id) is None
    assert not os.path.exists(output_dir(harness, task))
    assert await harness.store.purge(task.id) is None


@pytest_twisted.ensureDeferred
async def test_purge_of_a_running_or_queued_task_is_refused(harness):
    lane = Lane(1, queue=True)
    running = harness.submit("sleep", lane=lane)
    queued = harness.submit("sleep", lane=lane)
    for task in (running, queued):
        with pytest.raises(StillRunning):
            await harness.store.purge(task.id)
        assert await harness.store.get(task.id) is not None


@pytest_twisted.ensureDeferred
async def test_a_purged_task_is_not_written_back_when_its_cleanup_is_known(harness):
    task = harness.submit("sleep")
    pid = harness.spawn.protocol().pid
    harness.host.kills.survivors.add(pid)
    exit_with(harness.spawn.protocol(), 0)
    assert await harness.store.purge(task.id) is not None
    harness.host.kills.survivors.discard(pid)
    harness.clock.pump([0.05] * 5)  # the group is found empty: the engine reports the cleanup
    assert task.cleanup == "complete"
    assert await harness.store.get(task.id) is None


@pytest_twisted.ensureDeferred
async def test_prune_calls_forgotten_with_the_pruned_ids(harness):
    tasks = [finished(harness) for _ in range(3)]
    harness.clock.advance(2 * DAY)
    forgotten = []
    harness.store._forgotten = forgotten.extend
    await Retention(harness.store, Policy(keep_days=1, keep_bytes=0), harness.clock).prune()
    assert sorted(forgotten) == sorted(t.id for t in tasks)


# -- the database file

@pytest_twisted.ensureDeferred
async def test_pruning_shrinks_the_database_file(harness):
    for _ in range(3000):
        finished(harness)
    await harness.store.compact()
    before = (await harness.store.usage()).database_bytes
    harness.clock.advance(2 * DAY)
    await Retention(harness.store, Policy(keep_days=1, keep_bytes=0), harness.clock).prune()
    after = (await harness.store.usage()).database_bytes
    assert after < before / 2


# -- options

def test_size_suffixes_are_powers_of_1024():
    assert [parse_size(s) for s in ("4294967296", "512M", "4G", "1.5K", "2GiB", "1t", "0")] == \
        [4 << 30, 512 << 20, 4 << 30, 1536, 2 << 30, 1 << 40, 0]
    for bad in ("", "-1", "4X", "G", "1e9"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_retention_is_bounded_by_default():
    options = Options()
    options.parseOptions([])
    assert (options["keep-days"], options["keep-bytes"]) == (30.0, 4 << 30)


def test_retention_options_are_validated():
    options = Options()
    options.parseOptions(["--keep-days", "0.5", "--keep-bytes", "512M"])
    assert (options["keep-days"], options["keep-bytes"]) == (0.5, 512 << 20)
    for args in (["--keep-days", "-1"], ["--keep-days", "inf"], ["--keep-days", "nan"],
                 ["--keep-bytes", "lots"]):
        with pytest.raises(usage.UsageError):
            Options().parseOptions(args)


@pytest_twisted.ensureDeferred
async def test_keep_bytes_is_enforced_a_moment_after_tasks_end_not_an_hour_later(harness):
    """30 tasks used to fill a data dir to 12 times --keep-bytes between hourly prunes."""
    keeper = Retention(harness.store, Policy(keep_days=0, keep_bytes=1), harness.clock)
    keeper.startService()
    await keeper.idle()
    limit = (await harness.store.usage()).total + 250_000
    keeper.policy = Policy(keep_days=0, keep_bytes=limit)
    tasks = [finished(harness, b"x" * 100_000) for _ in range(5)]
    for task in tasks:
        keeper.observe(task)  # as the engine tells its observers
    assert len(harness.clock.getDelayedCalls()) == 2, "one size check for all, beside the hourly"
    assert all([await harness.store.get(t.id) is not None for t in tasks])
    harness.clock.advance(SIZE_CHECK_DELAY)
    await keeper.idle()
    await keeper.idle()
    assert (await harness.store.usage()).total <= limit
    assert await harness.store.get(tasks[0].id) is None and await harness.store.get(tasks[-1].id)
    await keeper.stopService()
    assert harness.clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_size_check_under_the_limit_prunes_nothing(harness):
    keeper = Retention(harness.store, Policy(keep_days=0, keep_bytes=1 << 30), harness.clock)
    keeper.startService()
    await keeper.idle()
    task = finished(harness, b"kept")
    keeper.observe(task)
    harness.clock.advance(SIZE_CHECK_DELAY)
    await keeper.idle()
    assert await harness.store.get(task.id) is not None
    await keeper.stopService()
