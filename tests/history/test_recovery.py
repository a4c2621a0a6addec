"""After a crash: what a dead agent left queued or running is marked lost, its groups ended."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess

import pytest_twisted

from agent.core.lanes import Lane
from agent.history.recovery import LOST_QUEUED, LOST_RUNNING
from agent.runner.procinfo import proc_stat
from tests.history.stores import Harness, create_history, insert_running, new_store
from tests.procs import group_members, wait_until_empty


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


def _sleeper_group():
    return subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60"], process_group=0)


@pytest_twisted.ensureDeferred
async def test_recovery_kills_the_group_a_lost_task_left_behind(tmp_path):
    create_history(tmp_path / "d")
    proc = _sleeper_group()
    try:
        stat = proc_stat(proc.pid)
        insert_running(tmp_path / "d", proc.pid, stat.start_time, stat.session)
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
    create_history(tmp_path / "d")
    proc = _sleeper_group()
    try:
        stat = proc_stat(proc.pid)
        insert_running(tmp_path / "d", proc.pid, stat.start_time - 1, stat.session)
        store = new_store(tmp_path / "d").open()
        assert proc.poll() is None and len(group_members(proc.pid)) >= 2
        store.start()
        await store.close()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_recovery_hands_the_runner_each_recorded_group_and_nothing_else(tmp_path):
    create_history(tmp_path / "d")
    with sqlite3.connect(tmp_path / "d" / "history.sqlite3") as db:
        for task_id, state, pid, start, session in [
                ("a" * 32, "running", 100, 5000, 7),
                ("b" * 32, "running", 101, None, None),  # recorded before its identity was read
                ("c" * 32, "queued", None, None, None),
                ("d" * 32, "succeeded", 102, 5001, 7)]:
            db.execute("INSERT INTO tasks (id, source, command, state, created_at, pid, proc_start, "
                       "session, stdout_bytes, stderr_bytes, stdout_dropped, stderr_dropped) "
                       "VALUES (?, 'http', '[\"sleep\"]', ?, 0, ?, ?, ?, 0, 0, 0, 0)",
                       (task_id, state, pid, start, session))
    handed = []
    store = new_store(tmp_path / "d", end_left_behind=lambda groups: handed.append(groups) or [])
    store.open()
    try:
        assert handed == [[(100, 5000, 7)]]
        assert sorted(store.recovered) == ["a" * 32, "b" * 32, "c" * 32]
    finally:
        store._database._connection.close()
        os.close(store._lock_fd)
