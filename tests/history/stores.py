"""A real Store for tests, wired to the runner's process functions as makeService wires it."""
from __future__ import annotations

from twisted.internet import reactor

from agent.history.store import Store
from agent.runner.procinfo import kill_left_behind, proc_stat


def new_store(data_dir, max_log_bytes: int = 256 << 20, keep_tcp_output: bool = False) -> Store:
    """Not yet opened; the store's thread answers through the real reactor."""
    return Store(data_dir, reactor, max_log_bytes, keep_tcp_output, identify=proc_stat,
                 end_left_behind=kill_left_behind)
