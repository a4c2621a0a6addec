"""The history when its disk is full or read-only: nothing acknowledged is lost, reads go on,
the log and /healthz say what is wrong, and writing resumes by itself once it can."""
from __future__ import annotations

import sqlite3
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher

from agent.history import writer
from agent.history.store import HistoryUnwritable
from tests.fakes import exit_with
from tests.history.stores import Harness
from tests.webapi import LiveApi, eventually


class FailingWrites:
    """Stands in for the store's connection: writes raise as on a full disk until healed."""

    def __init__(self, connection: sqlite3.Connection):
        self._connection = connection
        self.failing = True
        self.attempts = 0

    def executemany(self, sql, rows):
        self.attempts += 1
        if self.failing:
            list(rows)
            raise sqlite3.OperationalError("database or disk is full")
        return self._connection.executemany(sql, rows)

    def execute(self, sql, *args):
        if self.failing and sql.lstrip().split(None, 1)[0].upper() in ("INSERT", "UPDATE",
                                                                       "DELETE"):
            raise sqlite3.OperationalError("database or disk is full")
        return self._connection.execute(sql, *args)

    def __enter__(self):
        return self._connection.__enter__()

    def __exit__(self, *exc):
        return self._connection.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._connection, name)


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(writer, "RETRY_FIRST", 0.02)
    monkeypatch.setattr(writer, "RETRY_MAX", 0.05)


def _fill_disk(store) -> FailingWrites:
    """Swap the store's connection for one whose writes fail until healed."""
    database = store._database
    fault = database._connection = FailingWrites(database._connection)
    return fault


@pytest.fixture
def full_disk(tmp_path, quick_retries):
    harness = Harness(tmp_path / "data")
    fault = _fill_disk(harness.store)
    yield harness, fault
    fault.failing = False
    pytest_twisted.blockon(harness.store.close())


@pytest.fixture
def log_events():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def _on_disk(data_dir) -> dict[str, str]:
    connection = sqlite3.connect(data_dir / "history.sqlite3")
    try:
        return dict(connection.execute("SELECT id, state FROM tasks"))
    finally:
        connection.close()


async def _until(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        await deferLater(reactor, 0.01, lambda: None)


def _finished_task(harness, code=0):
    task = harness.submit("true", source="tcp")
    exit_with(harness.spawn.protocol(), code)
    return task


@pytest_twisted.ensureDeferred
async def test_records_that_cannot_be_written_wait_and_are_written_once_the_disk_heals(
        full_disk, tmp_path):
    harness, fault = full_disk
    tasks = [_finished_task(harness, code) for code in (0, 1, 2)]
    await _until(lambda: not harness.store.health()["writable"])
    assert _on_disk(tmp_path / "data") == {}
    fault.failing = False
    await _until(lambda: harness.store.health()["writable"])
    assert _on_disk(tmp_path / "data") == {tasks[0].id: "succeeded", tasks[1].id: "failed",
                                           tasks[2].id: "failed"}


@pytest_twisted.ensureDeferred
async def test_reads_go_on_while_writes_fail_and_show_the_waiting_records(full_disk):
    harness, fault = full_disk
    running = harness.submit("sleep", source="tcp")
    ended = _finished_task(harness, 3)
    await _until(lambda: not harness.store.health()["writable"])
    record = await harness.store.get(ended.id)
    assert (record.state, record.exit_code) == ("failed", 3)
    page = await harness.store.list()
    assert [r.id for r in page.records] == [ended.id, running.id]
    assert [r.id for r in (await harness.store.list(state="running")).records] == [running.id]


@pytest_twisted.ensureDeferred
async def test_a_newer_row_for_the_same_task_is_never_overwritten_by_a_retried_older_one(
        full_disk, tmp_path):
    harness, fault = full_disk
    task = harness.submit("sleep", source="tcp")
    await _until(lambda: not harness.store.health()["writable"])
    exit_with(harness.spawn.protocol(), 0)  # its end arrives while the running row waits
    fault.failing = False
    await _until(lambda: harness.store.health()["writable"])
    assert _on_disk(tmp_path / "data") == {task.id: "succeeded"}


@pytest_twisted.ensureDeferred
async def test_an_acknowledgement_waits_for_the_disk_and_fails_while_it_cannot_be_written(
        full_disk):
    harness, fault = full_disk
    task = _finished_task(harness)
    with pytest.raises(HistoryUnwritable, match="database or disk is full"):
        await harness.store.get_saved(task.id)
    fault.failing = False
    await _until(lambda: harness.store.health()["writable"])
    assert (await harness.store.get_saved(task.id)).state == "succeeded"


@pytest_twisted.ensureDeferred
async def test_the_log_says_once_what_is_wrong_and_then_that_it_recovered(full_disk, log_events):
    harness, fault = full_disk
    for _ in range(5):
        _finished_task(harness)
    await _until(lambda: fault.attempts >= 4)  # several retries, one complaint
    fault.failing = False
    await _until(lambda: harness.store.health()["writable"])
    await deferLater(reactor, 0.05, lambda: None)  # log calls travel by callFromThread
    texts = [e.get("log_format", "") for e in log_events if e.get("log_namespace") == "agent.history.writer"]
    assert sum("cannot write the task history" in t for t in texts) == 1
    assert sum("writable again" in t for t in texts) == 1
    failure = next(e for e in log_events if "cannot write" in e.get("log_format", ""))
    assert failure["error"].startswith("database or disk is full")


@pytest_twisted.ensureDeferred
async def test_waiting_records_are_bounded_dropping_the_oldest_ended_ones(full_disk, tmp_path):
    harness, fault = full_disk
    harness.store._database._max_waiting = 5
    running = harness.submit("sleep", source="tcp")
    ended = [_finished_task(harness) for _ in range(8)]
    await _until(lambda: harness.store.health()["dropped"] == 4)
    health = harness.store.health()
    assert (health["writable"], health["waiting"]) == (False, 5)
    fault.failing = False
    await _until(lambda: harness.store.health()["writable"])
    assert set(_on_disk(tmp_path / "data")) == {running.id, *(t.id for t in ended[4:])}


# -- the HTTP door


@pytest.fixture
def degraded_api(tmp_path, quick_retries):
    live = LiveApi(tmp_path / "data")
    fault = _fill_disk(live.store)
    yield live, fault
    fault.failing = False
    pytest_twisted.blockon(ensureDeferred(live.close()))


@pytest_twisted.ensureDeferred
async def test_no_task_is_created_whose_record_cannot_be_saved(degraded_api):
    api, fault = degraded_api
    refused = await api.json("POST", "/tasks", {"command": "sleep", "args": ["30"]}, expect=503)
    assert "history cannot be written" in refused["error"]
    assert "database or disk is full" in refused["error"]
    assert api.engine.live == {}  # the task that had started was ended at once


@pytest_twisted.ensureDeferred
async def test_while_degraded_healthz_says_why_and_tasks_are_refused_up_front(degraded_api):
    api, fault = degraded_api
    await api.json("POST", "/tasks", {"command": "true"}, expect=503)
    health = await api.json("GET", "/healthz", token=None)
    assert health["status"] == "degraded"
    assert health["history"]["writable"] is False
    assert "database or disk is full" in health["history"]["error"]
    assert health["history"]["since"].endswith("Z")
    spawned_before = fault.attempts
    for path in ("/tasks", "/run"):
        refused = await api.request("POST", path, {"command": "true"})
        assert refused.code == 503 and "no task is started" in (await refused.json())["error"]
        assert refused.headers.getRawHeaders("Retry-After") == ["5"]
    assert api.engine.live == {} and fault.attempts - spawned_before <= 2
    fault.failing = False
    await eventually(lambda: api.json("GET", "/healthz", token=None),
                     lambda h: h["status"] == "ok")
    await api.start("true")


@pytest_twisted.ensureDeferred
async def test_a_purge_while_the_history_cannot_be_written_is_503_and_removes_nothing(
        tmp_path, quick_retries):
    api = LiveApi(tmp_path / "data")
    try:
        done = await api.start("true")
        await api.wait_for_state(done["id"], "succeeded")
        fault = _fill_disk(api.store)
        await api.json("POST", "/tasks", {"command": "true"}, expect=503)  # the disk is full
        refused = await api.request("DELETE", f"/tasks/{done['id']}?purge=true")
        assert refused.code == 503 and "nothing was purged" in (await refused.json())["error"]
        assert refused.headers.getRawHeaders("Retry-After") == ["5"]
        fault.failing = False
        await eventually(lambda: api.json("GET", "/healthz", token=None),
                         lambda h: h["status"] == "ok")
        assert (await api.json("GET", f"/tasks/{done['id']}"))["state"] == "succeeded"
    finally:
        await api.close()
