"""After a crash: tasks a dead agent left queued or running are marked lost, their groups ended.

The history does not know how processes are read or killed: it hands the
groups it recorded (with the start time and session that tell them from a
later process given the same number) to the runner's function, which ends
those that are still the task's.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Callable

from twisted.logger import Logger

from agent.history import table
from agent.history.spool import size_on_disk

log = Logger()

LOST_RUNNING = "the agent stopped while the task was running"
LOST_QUEUED = "the agent stopped before the task started"

EndLeftBehind = Callable[[list[tuple[int, int, int]]], list[int]]
"""Ends each (pgid, start_time, session) group still the recorded task's; the pgids it ended
(agent.runner.procinfo.kill_left_behind)."""


def recover(connection: sqlite3.Connection, output_root: Path, now: float,
            end_left_behind: EndLeftBehind) -> list[str]:
    """Mark tasks a dead agent left queued or running as lost, and end what is left of them.

    Runs once at start, before the agent serves anything, so it may block.
    Returns the ids marked lost.
    """
    rows = table.unended(connection)
    if not rows:
        return []
    groups = [(pid, start, session) for _, state, pid, start, session in rows
              if state == "running" and pid and start is not None and session is not None]
    ended = end_left_behind(groups)
    table.mark_lost(connection, [
        (task_id, LOST_RUNNING if state == "running" else LOST_QUEUED, now,
         size_on_disk(output_root / task_id, 1), size_on_disk(output_root / task_id, 2))
        for task_id, state, *_ in rows])
    log.warn("{n} task(s) were queued or running when the agent last stopped: marked lost; "
             "killed {k} process group(s) they left behind", n=len(rows), k=len(ended))
    return [row[0] for row in rows]
