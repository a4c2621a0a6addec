"""The tasks table: opening the history database, its schema, and every statement on the table.

One file holds the table's SQL, so a column is added or an index changed in
one place. The functions take the connection: they run on the writer thread
(agent.history.writer), or at open, before the agent serves anything.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

from agent.history.records import COLUMNS, ENDED, Page, TaskRecord, command_text, from_row

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    command TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL, finished_at REAL, duration_ms REAL,
    exit_code INTEGER, error TEXT, pid INTEGER,
    stdout_bytes INTEGER NOT NULL, stderr_bytes INTEGER NOT NULL,
    stdout_dropped INTEGER NOT NULL, stderr_dropped INTEGER NOT NULL,
    timeout REAL, request_id TEXT, proc_start INTEGER, session INTEGER,
    reason TEXT, signal INTEGER, cleanup TEXT, launched_by TEXT,
    command_cut INTEGER NOT NULL DEFAULT 0, command_sha256 TEXT
);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state, seq);
"""
_ADDED_COLUMNS = {"reason": "TEXT", "signal": "INTEGER", "cleanup": "TEXT", "launched_by": "TEXT",
                  "command_cut": "INTEGER NOT NULL DEFAULT 0", "command_sha256": "TEXT"}
"""Columns later versions added: a history written by an older agent gets them on open."""
_UPSERT = (f"INSERT INTO tasks ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
           f"ON CONFLICT (id) DO UPDATE SET "
           + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c not in ("id", "created_at")))
_SELECT = f"SELECT seq, {', '.join(COLUMNS)} FROM tasks"
_COMMAND = 1 + COLUMNS.index("command")
_ENDED_MARKS = ", ".join("?" * len(ENDED))
_KEPT = "stdout_bytes - stdout_dropped + stderr_bytes - stderr_dropped"


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if need be) the history; WAL so a reader never waits for the writer.

    synchronous=NORMAL in WAL mode: a commit survives the agent being killed,
    only a power cut may lose the last moments.
    """
    connection = sqlite3.connect(path, check_same_thread=False)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = NORMAL")
    connection.executescript(SCHEMA)
    _add_missing_columns(connection)
    return connection


def _add_missing_columns(connection: sqlite3.Connection) -> None:
    present = {row[1] for row in connection.execute("PRAGMA table_info(tasks)")}
    with connection:
        for name, kind in _ADDED_COLUMNS.items():
            if name not in present:
                connection.execute(f"ALTER TABLE tasks ADD COLUMN {name} {kind}")


# -- records

def upsert(connection: sqlite3.Connection, rows: list[tuple]) -> None:
    """Insert or update rows in COLUMNS order, in one transaction; a task keeps its created_at."""
    with connection:
        connection.executemany(_UPSERT, rows)


def select_one(connection: sqlite3.Connection, task_id: str) -> TaskRecord | None:
    row = connection.execute(f"{_SELECT} WHERE id = ?", (task_id,)).fetchone()
    return None if row is None else from_row(row)[1]


PAGE_BYTES = 4 << 20
"""About the most a page's records may weigh: a page ends early past it (a listing of
1000 records of 300 kB each answered 300 MB and took the agent to 940 MB)."""
_RECORD_OVERHEAD = 700
"""What a record's JSON weighs beyond its command, error and launched_by, at most."""


def select_page(connection: sqlite3.Connection, state: str | None, limit: int,
                before: int | None, max_bytes: int = PAGE_BYTES, source: str | None = None,
                contains: str | None = None) -> Page:
    """Newest first, up to limit (and about max_bytes, but at least one record), before the
    cursor's seq; state and source None for any; contains: text the command holds (as the
    record keeps it: a word of one argument, say)."""
    where, args = [], []
    if state is not None:
        where.append("state = ?")
        args.append(state)
    if source is not None:
        where.append("source = ?")
        args.append(source)
    if contains:
        where.append("instr(command, ?) > 0")
        args.append(command_text(contains))
    if before is not None:
        where.append("seq < ?")
        args.append(before)
    sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq DESC LIMIT ?"
    rows, weight = [], 0
    for row in connection.execute(sql, (*args, limit + 1)):
        seq, record = from_row(row)
        weight += _RECORD_OVERHEAD + sum(len(str(v)) for v in (row[_COMMAND], record.error,
                                                              record.launched_by) if v)
        if rows and (len(rows) == limit or weight > max_bytes):
            return Page([r for _, r in rows], str(rows[-1][0]))
        rows.append((seq, record))
    return Page([record for _, record in rows], None)


MAX_INTEGER = (1 << 63) - 1
"""SQLite's largest integer: a number past it cannot name a row."""


def parse_cursor(cursor: str | None) -> int | None:
    """The seq a Page.next names; ValueError for anything select_page did not hand out."""
    if cursor is None:
        return None
    if not (cursor.isascii() and cursor.isdigit()) or int(cursor) > MAX_INTEGER:
        raise ValueError(f"not a cursor from this API: {cursor!r}")
    return int(cursor)


def has_record(connection: sqlite3.Connection, task_id: str) -> bool:
    return connection.execute("SELECT 1 FROM tasks WHERE id = ?", (task_id,)).fetchone() is not None


def idempotency_keys(connection: sqlite3.Connection):
    """(request id, task id) for every task submitted with one, oldest first."""
    return connection.execute(
        "SELECT request_id, id FROM tasks WHERE request_id IS NOT NULL "
        "AND request_id != '' ORDER BY seq")


# -- crash recovery

def unended(connection: sqlite3.Connection) -> list[tuple[str, str, int | None, int | None, int | None]]:
    """(id, state, pid, proc_start, session) of every task recorded queued or running."""
    return connection.execute(
        "SELECT id, state, pid, proc_start, session FROM tasks WHERE state IN ('queued', 'running')"
    ).fetchall()


def mark_lost(connection: sqlite3.Connection,
              lost: list[tuple[str, str, float, tuple[int, int], tuple[int, int]]]) -> None:
    """(id, error, finished_at, (stdout bytes, dropped), (stderr bytes, dropped)) each, at once."""
    with connection:
        for task_id, error, finished_at, (out, out_dropped), (err, err_dropped) in lost:
            connection.execute(
                "UPDATE tasks SET state = 'lost', reason = 'lost', exit_code = -1, error = ?, "
                "finished_at = ?, "
                "stdout_bytes = ?, stdout_dropped = ?, stderr_bytes = ?, stderr_dropped = ? "
                "WHERE id = ?",
                (error, finished_at, out, out_dropped, err, err_dropped, task_id))


# -- retention

def count_and_kept(connection: sqlite3.Connection) -> tuple[int, int]:
    """(rows, output bytes the ended tasks' records say their spools kept): one scan."""
    return connection.execute(
        f"SELECT COUNT(*), COALESCE(SUM(CASE WHEN state IN ({_ENDED_MARKS}) THEN {_KEPT} END), 0) "
        f"FROM tasks", ENDED).fetchone()


def ended_after(connection: sqlite3.Connection, after_seq: int, limit: int,
                finished_before: float | None = None) -> list[tuple[int, str, int]]:
    """(seq, id, kept bytes) of ended tasks in history order (oldest first) after after_seq;
    by primary key, no sort."""
    where, args = ["seq > ?", f"state IN ({_ENDED_MARKS})"], [after_seq, *ENDED]
    if finished_before is not None:
        where.append("COALESCE(finished_at, created_at) < ?")
        args.append(finished_before)
    return connection.execute(
        f"SELECT seq, id, {_KEPT} FROM tasks WHERE {' AND '.join(where)} ORDER BY seq LIMIT ?",
        (*args, limit)).fetchall()


def still_ended(connection: sqlite3.Connection, task_ids: list[str]) -> list[str]:
    """Those of task_ids that are in the history and ended."""
    return [row[0] for row in connection.execute(
        f"SELECT id FROM tasks WHERE id IN ({', '.join('?' * len(task_ids))}) "
        f"AND state IN ({_ENDED_MARKS})", (*task_ids, *ENDED))]


def delete(connection: sqlite3.Connection, task_ids: list[str]) -> None:
    with connection:
        connection.execute(f"DELETE FROM tasks WHERE id IN ({', '.join('?' * len(task_ids))})",
                           task_ids)
