"""Real Stores for tests, wired to the runner's process functions as makeService wires them."""
from __future__ import annotations

import os
import sqlite3

from twisted.internet import reactor

from agent.core.lanes import Lane
from agent.core.request import TaskRequest
from agent.history.store import Store
from tests.fakes import StdoutCollector
from agent.runner.procinfo import kill_left_behind, proc_stat
from tests.fakes import FakeHost


def new_store(data_dir, max_log_bytes: int = 256 << 20, keep_tcp_output: bool = False,
              identify=proc_stat, end_left_behind=kill_left_behind) -> Store:
    """Not yet opened; the store's thread answers through the real reactor."""
    return Store(data_dir, reactor, max_log_bytes, keep_tcp_output, identify=identify,
                 end_left_behind=end_left_behind)


class Harness:
    """An engine on a Clock with fake children (tests.fakes.FakeHost), feeding a real Store."""

    def __init__(self, data_dir, max_log_bytes=1 << 20, **processes):
        self.store = new_store(data_dir, max_log_bytes, **processes).open()
        host = FakeHost(self.store)
        host.clock.advance(1_700_000_000)
        self.host = host
        self.clock, self.spawn, self.engine = host.clock, host.spawn, host.engine
        self.store.start()

    def submit(self, *argv, lane=None, timeout=None, source="http"):
        return self.engine.submit(TaskRequest(tuple(argv), timeout), lane or Lane(0),
                                  StdoutCollector(), source=source)


def create_history(data_dir):
    """The schema on disk and no agent holding it, as after a crash."""
    store = new_store(data_dir).open()
    store._database._connection.close()
    os.close(store._lock_fd)


def insert_running(data_dir, pid, proc_start, session):
    with sqlite3.connect(data_dir / "history.sqlite3") as db:
        db.execute("INSERT INTO tasks (id, source, command, state, created_at, pid, proc_start, "
                   "session, stdout_bytes, stderr_bytes, stdout_dropped, stderr_dropped) "
                   "VALUES (?, 'http', '[\"sleep\"]', 'running', 0, ?, ?, ?, 0, 0, 0, 0)",
                   ("a" * 32, pid, proc_start, session))
