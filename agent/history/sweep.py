"""Output no record points to, left by an agent killed at the wrong moment, removed at start.

The clean-stop mark tells a run that was killed from one that stopped: only
after a kill is the output directory worth a look.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from twisted.logger import Logger

from agent.history import table
from agent.history.prune import remove_output
from agent.history.records import TASK_ID

log = Logger()

CLEAN_STOP = "clean-stop"
"""Written when the store closes after writing everything; taken at open. Its
absence at open means the last run was killed (or this is the first)."""


def leave_clean_stop_mark(data_dir: Path) -> None:
    (data_dir / CLEAN_STOP).touch(mode=0o600)


def take_clean_stop_mark(data_dir: Path) -> bool:
    """True if the last run closed the store cleanly; either way, the mark is gone now."""
    try:
        (data_dir / CLEAN_STOP).unlink()
    except FileNotFoundError:
        return False
    return True


def sweep_orphan_output(connection: sqlite3.Connection, output_root: Path) -> int:
    """Remove output directories no record points to; how many.

    A task whose first record had not reached the disk when the agent was
    killed leaves its output behind with no row, and neither retention nor a
    purge would ever find it. At start nothing is running, so what has no
    row is garbage. Names that are not task ids are left alone. Only after a
    run that did not stop cleanly: it costs a lookup per directory (0.4 s for
    100k), and only a killed agent leaves such directories.
    """
    try:
        names = [entry.name for entry in os.scandir(output_root) if entry.is_dir()]
    except FileNotFoundError:
        return 0
    swept, freed = 0, 0
    for name in names:
        if not TASK_ID.match(name) or table.has_record(connection, name):
            continue
        try:
            freed += remove_output(output_root / name)
        except OSError as e:
            log.warn("cannot remove output {name} that no task record points to: {error}",
                     name=name, error=e)
            continue
        swept += 1
    if swept:
        log.warn("removed the output of {n} task(s) that had no record ({freed} bytes), "
                 "left by an agent killed before their first record was written",
                 n=swept, freed=freed)
    return swept
