"""Removing ended tasks and their output, and keeping the database file no larger than its rows.

These are the blocking halves of retention and purge: each function is one
job on the writer thread (or runs at open), called through the Store, which
filters out every task it still holds in memory before anything is removed.
The policy that decides what goes is agent.history.retention.
"""
from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from twisted.logger import Logger

from agent.history import table
from agent.history.records import TaskRecord

log = Logger()

DATABASE_FILES = ("history.sqlite3", "history.sqlite3-wal", "history.sqlite3-shm")


class StillRunning(Exception):
    """The task is queued or running: only an ended task may be purged."""


@dataclass(frozen=True)
class Usage:
    """What the data dir holds, as far as retention counts it."""

    database_bytes: int
    """history.sqlite3 and its -wal and -shm files, as they are on disk."""
    output_bytes: int
    """Output files, estimated from the records: the bytes each stream kept."""
    rows: int

    @property
    def total(self) -> int:
        return self.database_bytes + self.output_bytes


@dataclass(frozen=True)
class Candidate:
    """An ended task that may be pruned, in history order."""

    seq: int
    id: str
    kept_bytes: int


@dataclass(frozen=True)
class Batch:
    candidates: list[Candidate]
    last_seq: int | None
    """Where the next batch starts; None when this one reached the end of the history."""


@dataclass(frozen=True)
class Removed:
    ids: list[str]
    output_bytes: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    """(task id, why) for each task kept because its output could not be removed."""


def prepare(connection: sqlite3.Connection) -> None:
    """Let deleted rows give their pages back to the file system (at open).

    auto_vacuum = INCREMENTAL keeps a map of free pages that
    `PRAGMA incremental_vacuum` truncates off the file in a moment; it only
    applies to a database created with it, so a history from before is
    converted once with VACUUM (a rewrite: seconds for 100,000 tasks, once).
    """
    if connection.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
        return
    connection.execute("PRAGMA auto_vacuum = INCREMENTAL")
    try:
        connection.execute("VACUUM")
    except sqlite3.Error as e:  # it needs room for a copy: on a full disk it must not stop the agent
        log.warn("cannot convert the history to incremental vacuum ({why}): pruning will free "
                 "pages for reuse but not shrink the file", why=str(e))


def measure(connection: sqlite3.Connection, data_dir: Path) -> Usage:
    """Database files by stat, ended tasks' output by their records: one scan, no directory walk."""
    rows, kept = table.count_and_kept(connection)
    return Usage(database_bytes(data_dir), kept, rows)


def database_bytes(data_dir: Path) -> int:
    total = 0
    for name in DATABASE_FILES:
        try:
            total += os.stat(data_dir / name).st_size
        except FileNotFoundError:
            pass
    return total


def candidates(connection: sqlite3.Connection, after_seq: int, limit: int,
               finished_before: float | None = None) -> Batch:
    """Ended tasks in history order (oldest first) after after_seq, a batch of up to limit."""
    rows = table.ended_after(connection, after_seq, limit, finished_before)
    return Batch([Candidate(*row) for row in rows], rows[-1][0] if len(rows) == limit else None)


def remove(connection: sqlite3.Connection, output_root: Path, task_ids: list[str]) -> Removed:
    """Delete ended tasks' output directories, then their rows, in one transaction.

    Output goes first: an agent killed in between leaves rows whose output is
    gone, which the next prune takes again, rather than directories no row
    points to any more, which nothing would ever remove.
    """
    if not task_ids:
        return Removed([], 0)
    gone, freed, failures = [], 0, []
    for task_id in table.still_ended(connection, task_ids):
        try:
            freed += remove_output(output_root / task_id)
        except OSError as e:
            failures.append((task_id, f"{e.strerror or e}"))
            continue
        gone.append(task_id)
    if gone:
        table.delete(connection, gone)
    return Removed(gone, freed, failures)


def remove_output(directory: Path) -> int:
    """Remove a task's output directory; the bytes its files held (0 if it had none).

    Never follows a symlink: every step is relative to a descriptor opened with
    O_NOFOLLOW, so a link planted as output/<id> (or inside it) is removed as a
    link and what it points to is left alone."""
    parent = os.open(directory.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:
            own = os.open(directory.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=parent)
        except FileNotFoundError:
            return 0
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            log.warn("{path} is not a directory the agent made (a symlink?): removed it, "
                     "not what it points to", path=str(directory))
            os.unlink(directory.name, dir_fd=parent)
            return 0
        try:
            freed = _empty(own)
        finally:
            os.close(own)
        os.rmdir(directory.name, dir_fd=parent)
        return freed
    finally:
        os.close(parent)


def _empty(directory_fd: int) -> int:
    freed = 0
    with os.scandir(directory_fd) as entries:
        for entry in list(entries):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.name, dir_fd=directory_fd)  # safe from symlinks on Linux
                continue
            try:
                freed += entry.stat(follow_symlinks=False).st_size
                os.unlink(entry.name, dir_fd=directory_fd)
            except FileNotFoundError:
                pass
    return freed


def purge_one(connection: sqlite3.Connection, output_root: Path, task_id: str) -> TaskRecord | None:
    """The record, then its output and row gone; StillRunning if it has not ended."""
    record = table.select_one(connection, task_id)
    if record is None:
        return None
    if not record.ended:
        raise StillRunning(task_id)
    removed = remove(connection, output_root, [task_id])
    if removed.failures:
        raise OSError(f"cannot remove the output of task {task_id}: {removed.failures[0][1]}")
    return record


def compact(connection: sqlite3.Connection, data_dir: Path) -> int:
    """Give freed pages back and empty the write-ahead log; the database's bytes after."""
    # executescript steps each statement to its end; execute() would free a single page
    connection.executescript("PRAGMA incremental_vacuum; PRAGMA wal_checkpoint(TRUNCATE);")
    return database_bytes(data_dir)
