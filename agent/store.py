"""Task history: SQLite records written off the reactor thread, and output spool files.

The store watches the engine (an observer and an output tap), so tasks from
both doors land in one history without the doors knowing about it. Every
SQL statement runs on one thread that owns the one connection, in FIFO
order; writes are coalesced per task and every read first applies the
writes still pending, so a read can never overtake a write: a task is
visible as soon as the engine has told the store about it.

Nothing above the store writes files or SQL.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import sqlite3
import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from agent import procinfo
from agent.outcome import Ending
from agent.spool import StreamReader, TaskOutput, size_on_disk

log = Logger()

STATES = ("queued", "running", "succeeded", "failed", "timed_out", "cancelled", "lost")
ENDED_STATES = frozenset(STATES[2:])
_STATE_OF_ENDING = {Ending.TIMED_OUT: "timed_out", Ending.CANCELLED: "cancelled"}
TASK_ID = re.compile(r"^[0-9a-f]{32}$")
LOST_RUNNING = "the agent stopped while the task was running"
LOST_QUEUED = "the agent stopped before the task started"


class DataDirInUse(Exception):
    """Another agent holds this data directory: its running tasks are not ours to mark lost."""


@dataclass(frozen=True)
class TaskRecord:
    """One task as the history knows it; times are UNIX seconds."""

    id: str
    source: str
    command: tuple[str, ...]
    state: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    duration_ms: float | None = None
    exit_code: int | None = None
    error: str | None = None
    pid: int | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    stdout_dropped: int = 0
    stderr_dropped: int = 0
    timeout: float | None = None
    request_id: str | None = None
    proc_start: int | None = None
    """/proc start time of pid, with session: tells our group from a later one that reused the PID."""
    session: int | None = None

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES


@dataclass(frozen=True)
class Page:
    records: list[TaskRecord]
    next: str | None
    """The cursor for the following page, None on the last one."""


_COLUMNS = tuple(f.name for f in fields(TaskRecord))
_SCHEMA = f"""
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
    timeout REAL, request_id TEXT, proc_start INTEGER, session INTEGER
);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state, seq);
"""
_UPSERT = (f"INSERT INTO tasks ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
           f"ON CONFLICT (id) DO UPDATE SET "
           + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS if c not in ("id", "created_at")))
_SELECT = f"SELECT seq, {', '.join(_COLUMNS)} FROM tasks"


def _to_row(record: TaskRecord) -> tuple:
    return tuple(json.dumps(list(record.command)) if name == "command" else getattr(record, name)
                 for name in _COLUMNS)


def _from_row(row: tuple) -> tuple[int, TaskRecord]:
    values = dict(zip(_COLUMNS, row[1:]))
    values["command"] = tuple(json.loads(values["command"]))
    return row[0], TaskRecord(**values)


def state_of(task) -> str:
    """The history's word for an engine task's state."""
    if task.state != "finished":
        return task.state
    outcome = task.outcome
    if outcome.ending is Ending.EXITED:
        return "succeeded" if outcome.exit_code == 0 else "failed"
    return _STATE_OF_ENDING.get(outcome.ending, "failed")


class _Live:
    """What the store keeps in memory for a task while it is queued or running."""

    __slots__ = ("created_at", "output", "proc_start", "session")

    def __init__(self, created_at: float, output: TaskOutput):
        self.created_at = created_at
        self.output = output
        self.proc_start: int | None = None
        self.session: int | None = None


class _SerialDatabase:
    """One connection used by one thread; writes coalesce per task, reads apply them first."""

    def __init__(self, connection: sqlite3.Connection, reactor):
        self._connection = connection
        self._reactor = reactor
        self._pool = ThreadPool(1, 1, "agent-store")
        self._lock = threading.Lock()
        self._pending: dict[str, tuple] = {}
        self._flush_queued = False

    def start(self) -> None:
        self._pool.start()

    def write(self, record: TaskRecord) -> None:
        """Cheap on the reactor thread: a dict entry, and a wake-up when none is queued."""
        with self._lock:
            self._pending[record.id] = _to_row(record)
            wake, self._flush_queued = not self._flush_queued, True
        if wake:
            self._pool.callInThread(self._flush_reporting_errors)

    def run(self, query, *args) -> Deferred:
        """query(connection, *args) on the store thread, after every write made before."""
        return deferToThreadPool(self._reactor, self._pool, self._query, query, *args)

    def close(self) -> Deferred:
        closed = self.run(lambda connection: connection.close())
        closed.addBoth(self._stop_pool)
        return closed

    def _stop_pool(self, result):
        self._pool.stop()
        return result

    def _query(self, query, *args):
        self._flush()
        return query(self._connection, *args)

    def _flush(self) -> None:
        with self._lock:
            rows, self._pending, self._flush_queued = self._pending, {}, False
        if rows:
            with self._connection:
                self._connection.executemany(_UPSERT, rows.values())

    def _flush_reporting_errors(self) -> None:
        try:
            self._flush()
        except Exception:
            self._reactor.callFromThread(log.failure, "cannot write task records", Failure())


class Store:
    """The history of every task, and the output each one wrote."""

    def __init__(self, data_dir: str | os.PathLike, reactor, max_log_bytes: int = 256 << 20):
        self._reactor = reactor
        self._data_dir = Path(data_dir)
        self._max_log_bytes = max_log_bytes
        self._live: dict[str, _Live] = {}
        self._lock_fd: int | None = None
        self._database: _SerialDatabase | None = None
        self.recovered: list[str] = []

    # -- lifecycle

    def open(self) -> Store:
        """Take the data dir, open the history and recover from a crash.

        Blocking, once, before the agent serves anything (twistd calls it from
        privilegedStartService); DataDirInUse if another agent has it.
        """
        self._data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock(self._data_dir / "lock")
        connection = _connect(self._data_dir / "history.sqlite3")
        self.recovered = _recover(connection, self._data_dir, self._reactor.seconds())
        self._database = _SerialDatabase(connection, self._reactor)
        return self

    def start(self) -> None:
        """Start the store's thread; records and reads wait in its queue until then."""
        self._database.start()

    def close(self) -> Deferred:
        """Write what is pending, then close; the Deferred fires when it is on disk."""
        closed = self._database.close()
        closed.addBoth(self._unlock)
        return closed

    def _unlock(self, result):
        os.close(self._lock_fd)
        self._lock_fd = None
        return result

    # -- fed by the engine

    def observe(self, task) -> None:
        """Engine observer: record the task as queued, running, or ended."""
        live = self._live_entry(task)
        if task.state == "running" and live.proc_start is None and task.runner.pid:
            stat = procinfo.proc_stat(task.runner.pid)
            if stat is not None:
                live.proc_start, live.session = stat.start_time, stat.session
        record = self._record(task, live)
        if task.state == "finished":
            del self._live[task.id]
        self._database.write(record)
        if task.state == "finished":
            live.output.end()

    def tap(self, task) -> TaskOutput:
        """Engine output tap: the spool the task's output goes to."""
        return self._live_entry(task).output

    def _live_entry(self, task) -> _Live:
        live = self._live.get(task.id)
        if live is None:
            live = self._live[task.id] = _Live(
                self._reactor.seconds(), TaskOutput(self.output_dir(task.id), self._max_log_bytes))
        return live

    def _record(self, task, live: _Live) -> TaskRecord:
        runner, outcome, now = task.runner, task.outcome, self._reactor.seconds()
        record = TaskRecord(
            id=task.id, source=task.source, command=tuple(task.request.command),
            state=state_of(task), created_at=live.created_at,
            timeout=task.request.timeout, request_id=task.request.id,
            proc_start=live.proc_start, session=live.session)
        if runner is not None:
            record = replace(record, pid=runner.pid, started_at=runner.started_at)
        if outcome is not None:
            finished_at = (outcome.started_at + outcome.duration_ms / 1000.0
                           if outcome.started else now)
            record = replace(record, started_at=outcome.started_at, finished_at=finished_at,
                             duration_ms=outcome.duration_ms, exit_code=outcome.exit_code,
                             error=outcome.error, pid=outcome.pid if outcome.started else None)
        return _with_sizes(record, live.output)

    # -- read by the HTTP door

    def get(self, task_id: str) -> Deferred[TaskRecord | None]:
        if not TASK_ID.match(task_id):
            return succeed(None)
        d = self._database.run(_select_one, task_id)
        d.addCallback(lambda record: record and self._fresh(record))
        return d

    def list(self, state: str | None = None, limit: int = 100,
             cursor: str | None = None) -> Deferred[Page]:
        """Newest first; cursor is a Page.next from the page before (ValueError if it is not)."""
        before = _parse_cursor(cursor)
        d = self._database.run(_select_page, state, limit, before)
        d.addCallback(lambda page: Page([self._fresh(r) for r in page.records], page.next))
        return d

    def live_output(self, task_id: str) -> TaskOutput | None:
        live = self._live.get(task_id)
        return None if live is None else live.output

    def reader(self, task_id: str, fd: int, offset: int = 0) -> StreamReader:
        return StreamReader(self.output_dir(task_id), fd, offset, self.live_output(task_id))

    def output_dir(self, task_id: str) -> Path:
        if not TASK_ID.match(task_id):
            raise ValueError(f"not a task id: {task_id!r}")
        return self._data_dir / "output" / task_id

    def _fresh(self, record: TaskRecord) -> TaskRecord:
        """A running task's byte counts move faster than its record: take them from the spool."""
        live = self._live.get(record.id)
        return record if live is None else _with_sizes(record, live.output)


def _with_sizes(record: TaskRecord, output: TaskOutput) -> TaskRecord:
    (out, out_dropped), (err, err_dropped) = output.size(1), output.size(2)
    return replace(record, stdout_bytes=out, stderr_bytes=err,
                   stdout_dropped=out_dropped, stderr_dropped=err_dropped)


def _select_one(connection, task_id: str) -> TaskRecord | None:
    row = connection.execute(f"{_SELECT} WHERE id = ?", (task_id,)).fetchone()
    return None if row is None else _from_row(row)[1]


def _select_page(connection, state: str | None, limit: int, before: int | None) -> Page:
    where, args = [], []
    if state is not None:
        where.append("state = ?")
        args.append(state)
    if before is not None:
        where.append("seq < ?")
        args.append(before)
    sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq DESC LIMIT ?"
    rows = [_from_row(row) for row in connection.execute(sql, (*args, limit + 1))]
    more = len(rows) > limit
    rows = rows[:limit]
    return Page([record for _, record in rows], str(rows[-1][0]) if more else None)


def _parse_cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    if not cursor.isdigit():
        raise ValueError(f"not a cursor from this API: {cursor!r}")
    return int(cursor)


def _lock(path: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirInUse(f"{path.parent} is in use by another agent") from None
    return fd


def _connect(path: Path) -> sqlite3.Connection:
    """Open (creating if need be) the history; WAL so a reader never waits for the writer.

    synchronous=NORMAL in WAL mode: a commit survives the agent being killed,
    only a power cut may lose the last moments.
    """
    connection = sqlite3.connect(path, check_same_thread=False)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = NORMAL")
    connection.executescript(_SCHEMA)
    return connection


def _recover(connection: sqlite3.Connection, data_dir: Path, now: float) -> list[str]:
    """Mark tasks a dead agent left queued or running as lost, and kill what is left of them.

    Runs once at start, before the agent serves anything, so it may block.
    Returns the ids marked lost.
    """
    rows = connection.execute(
        "SELECT id, state, pid, proc_start, session FROM tasks WHERE state IN ('queued', 'running')"
    ).fetchall()
    if not rows:
        return []
    groups = [(pid, start, session) for _, state, pid, start, session in rows
              if state == "running" and pid and start is not None and session is not None]
    killed = procinfo.kill_left_behind(groups)
    with connection:
        for task_id, state, *_ in rows:
            out, out_dropped = size_on_disk(data_dir / "output" / task_id, 1)
            err, err_dropped = size_on_disk(data_dir / "output" / task_id, 2)
            connection.execute(
                "UPDATE tasks SET state = 'lost', exit_code = -1, error = ?, finished_at = ?, "
                "stdout_bytes = ?, stdout_dropped = ?, stderr_bytes = ?, stderr_dropped = ? "
                "WHERE id = ?",
                (LOST_RUNNING if state == "running" else LOST_QUEUED, now,
                 out, out_dropped, err, err_dropped, task_id))
    log.warn("{n} task(s) were queued or running when the agent last stopped: marked lost; "
             "killed {k} process group(s) they left behind", n=len(rows), k=len(killed))
    return [row[0] for row in rows]
