"""The history: every engine task recorded off the reactor thread, readable at once, kept across restarts."""
from __future__ import annotations

import pytest
import pytest_twisted

from agent.core.lanes import Lane
from tests.fakes import exit_with
from tests.history.stores import Harness


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
async def test_news_after_the_end_changes_nothing_and_leaks_nothing(harness):
    t = harness.submit("echo")
    harness.spawn.protocol().childDataReceived(1, b"abc")
    exit_with(harness.spawn.protocol(), 0)
    harness.store.observe(t)  # as the engine does once the task's group is found empty
    record = await harness.store.get(t.id)
    assert (record.state, record.stdout_bytes) == ("succeeded", 3)
    assert harness.store._live == {}


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
