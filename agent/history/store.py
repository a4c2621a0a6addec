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
import queue
import re
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from agent.history import retention
from agent.history.keyindex import KeyIndex
from agent.core.outcome import Ending
from agent.history.spool import StreamReader, TaskOutput, size_on_disk

log = Logger()

STATES = ("queued", "running", "succeeded", "failed", "timed_out", "cancelled", "lost")
ENDED_STATES = frozenset(STATES[2:])
_STATE_OF_ENDING = {Ending.TIMED_OUT: "timed_out", Ending.CANCELLED: "cancelled"}
TASK_ID = re.compile(r"^[0-9a-f]{32}$")
LOST_RUNNING = "the agent stopped while the task was running"
LOST_QUEUED = "the agent stopped before the task started"


class ProcessIdentity(Protocol):
    """What tells a process from a later one given the same PID (agent.runner.procinfo.ProcStat)."""

    start_time: int
    session: int


Identify = Callable[[int], "ProcessIdentity | None"]
"""A live process's identity by PID, None once it is gone."""

EndLeftBehind = Callable[[list[tuple[int, int, int]]], list[int]]
"""Ends each (pgid, start_time, session) group still the recorded task's; the pgids it ended."""


class DataDirInUse(Exception):
    """Another agent holds this data directory: its running tasks are not ours to mark lost."""


class StillRunning(Exception):
    """The task is queued or running: only an ended task may be purged."""


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
    reason: str | None = None
    """Why it ended: an agent.core.outcome.Ending value, or 'lost'; None while it runs
    (and for tasks recorded before the agent kept reasons)."""
    signal: int | None = None
    """The signal that killed it, when the agent did not send it."""
    cleanup: str | None = None
    """'complete' once its process group was verified empty, 'incomplete' if a
    member survived repeated SIGKILL; None until known."""

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
    timeout REAL, request_id TEXT, proc_start INTEGER, session INTEGER,
    reason TEXT, signal INTEGER, cleanup TEXT
);
CREATE INDEX IF NOT EXISTS tasks_by_state ON tasks (state, seq);
"""
_ADDED_COLUMNS = {"reason": "TEXT", "signal": "INTEGER", "cleanup": "TEXT"}
"""Columns later versions added: a history written by an older agent gets them on open."""
_UPSERT = (f"INSERT INTO tasks ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
           f"ON CONFLICT (id) DO UPDATE SET "
           + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS if c not in ("id", "created_at")))
_SELECT = f"SELECT seq, {', '.join(_COLUMNS)} FROM tasks"


def _row_of(task, live: "_Live", now: float) -> tuple:
    """An engine task as a row in _COLUMNS order, built straight from its attributes:
    this runs on the reactor for every state change of every task, TCP ones included."""
    runner, outcome = task.runner, task.outcome
    pid = started_at = finished_at = duration_ms = exit_code = error = reason = signal = None
    if runner is not None:
        pid, started_at = runner.pid, runner.started_at
    if outcome is not None:
        exit_code, error, duration_ms = outcome.exit_code, outcome.error, outcome.duration_ms
        reason, signal = outcome.ending.value, outcome.signal
        if outcome.started:
            pid, started_at = outcome.pid, outcome.started_at
            finished_at = started_at + duration_ms / 1000.0
        else:
            pid = started_at = None
            finished_at = now
    (out, out_dropped), (err, err_dropped) = live.output.size(1), live.output.size(2)
    request = task.request
    return (task.id, task.source, live.command_json, state_of(task), live.created_at,
            started_at, finished_at, duration_ms, exit_code, error, pid,
            out, err, out_dropped, err_dropped, request.timeout, request.id, None, None,
            reason, signal, task.cleanup)


_STATE, _PID, _PROC_START = _COLUMNS.index("state"), _COLUMNS.index("pid"), _COLUMNS.index("proc_start")
_CLEANUP = _COLUMNS.index("cleanup")


def _with_identity(row: tuple, identify: Identify) -> tuple:
    """A running task's row gets its process's start time and session, read from /proc when
    the row is written: a task that ended before then needs none, so short tasks cost no read.
    The task is recorded as ended when its child is reaped (or at most the drain grace later),
    so the PID is still the child's, or gone, never yet another process's."""
    if row[_STATE] != "running" or not row[_PID]:
        return row
    stat = identify(row[_PID])
    if stat is None:
        return row
    return (*row[:_PROC_START], stat.start_time, stat.session, *row[_PROC_START + 2:])


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

    __slots__ = ("created_at", "command_json", "output")

    def __init__(self, created_at: float, command_json: str, output: TaskOutput):
        self.created_at = created_at
        self.command_json = command_json
        self.output = output


WRITE_DELAY = 0.01
"""Seconds a record may wait to be written with the ones after it: one
transaction per burst instead of one thread hand-off and commit per change.
A read never waits for it (it applies pending writes first)."""


RETRY_FIRST, RETRY_MAX = 0.5, 30.0
"""Seconds between attempts to write while writing fails (a full disk, a read-only
file system): doubling, so a dead disk is not hammered, capped, so a freed one is
noticed soon."""

MAX_WAITING = 100_000
"""Records kept in memory while they cannot be written. Past it the oldest ended
ones are dropped (counted, logged, shown in /healthz): their TCP results were
delivered and HTTP tasks started meanwhile were refused, so memory wins."""


class HistoryUnwritable(Exception):
    """The history cannot be written now; the message says why."""


class _SerialDatabase:
    """One connection used by one thread; writes coalesce per task, reads apply them first.

    The thread takes jobs (reads, close) from a FIFO queue; a write only fills
    a dict and, if none is due, queues a flush, which waits up to WRITE_DELAY
    for more before one transaction writes them all. A write that fails puts
    its rows back (a newer row for the same task wins) and is retried with
    back-off; reads go on meanwhile, and the Store lays waiting rows over them.
    """

    _FLUSH = object()
    _CLOSE = object()

    def __init__(self, connection: sqlite3.Connection, reactor, identify: Identify,
                 write_delay: float = WRITE_DELAY, max_waiting: int = MAX_WAITING):
        self._connection = connection
        self._identify = identify
        self._reactor = reactor
        self._write_delay = write_delay
        self._max_waiting = max_waiting
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: dict[str, tuple] = {}
        self._flush_queued = False
        self.trouble: tuple[str, float] | None = None
        """(why writing fails, since when as UNIX time) while it fails; None when fine."""
        self.dropped = 0
        """Records given up while writing failed (over max_waiting)."""
        self._retry_delay = RETRY_FIRST
        self._retry_at = 0.0
        self._thread = threading.Thread(target=self._serve, name="agent-store", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def write(self, task_id: str, row: tuple) -> None:
        """Cheap on the reactor thread: a dict entry, and a wake-up when none is queued."""
        with self._lock:
            self._pending[task_id] = row
            wake, self._flush_queued = not self._flush_queued, True
        if wake:
            self._jobs.put(self._FLUSH)

    def waiting_row(self, task_id: str) -> tuple | None:
        """The newest row for the task not yet written, if any."""
        return self._pending.get(task_id)

    def waiting_rows(self) -> list[tuple]:
        with self._lock:
            return list(self._pending.values())

    @property
    def waiting(self) -> int:
        """How many rows wait to be written, without copying them."""
        return len(self._pending)

    def run(self, query, *args) -> Deferred:
        """query(connection, *args) on the store thread, after every write made before
        (or after trying them, while writing fails)."""
        done: Deferred = Deferred()
        self._jobs.put((done, query, args))
        return done

    def run_saved(self, query, *args) -> Deferred:
        """As run, but fails with HistoryUnwritable unless every earlier write is on disk."""
        return self.run(self._saved, query, *args)

    def close(self) -> Deferred:
        """Write what is pending, close the connection, end the thread."""
        closed: Deferred = Deferred()
        self._jobs.put((closed, self._CLOSE, ()))
        closed.addBoth(self._join)
        return closed

    def _join(self, result):
        self._thread.join()
        return result

    # -- on the store thread

    def _serve(self) -> None:
        # Signals are the main thread's business. Interrupted by one (every task's SIGCHLD),
        # a timed queue.get can turn into an endless wait (CPython 3.11 recomputes a timeout
        # that has just expired as a negative, i.e. infinite, one), and the writes stall.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        job = None
        while True:
            if job is None:
                job = self._next_job()
            if job is self._FLUSH:
                try:  # a read or close coming meanwhile ends the wait: it flushes first anyway
                    job = self._jobs.get(timeout=self._write_delay)
                except queue.Empty:
                    job = None
                self._try_flush()
                continue
            done, query, args = job
            job = None
            if query is self._CLOSE:
                self._answer(done, self._close)
                return
            self._answer(done, self._query, query, *args)

    def _next_job(self):
        if self.trouble is None:
            return self._jobs.get()
        try:
            return self._jobs.get(timeout=max(0.0, self._retry_at - time.monotonic()))
        except queue.Empty:
            return self._FLUSH  # time to try again

    def _answer(self, done: Deferred, fn, *args) -> None:
        try:
            result = fn(*args)
        except BaseException:
            self._reactor.callFromThread(done.errback, Failure())
        else:
            self._reactor.callFromThread(done.callback, result)

    def _query(self, query, *args):
        self._try_flush()
        return query(self._connection, *args)

    def _saved(self, connection, query, *args):
        if self.trouble is not None:
            raise HistoryUnwritable(self.trouble[0])
        return query(connection, *args)

    def _close(self) -> None:
        try:
            self._flush()
        except Exception as e:
            self._reactor.callFromThread(
                log.error, "{n} task record(s) could not be written before the agent stopped: "
                           "{error}", n=len(self._pending), error=_describe_error(e))
        self._connection.close()

    def _try_flush(self) -> None:
        """Write what waits, unless writing fails and the next attempt is not due yet."""
        if self.trouble is not None and time.monotonic() < self._retry_at:
            return
        try:
            written = self._flush()
        except Exception as e:
            self._failed(e)
        else:
            if self.trouble is not None:
                self._recovered(written)

    def _flush(self) -> int:
        with self._lock:
            rows, self._pending, self._flush_queued = self._pending, {}, False
        if rows:
            try:
                with self._connection:
                    self._connection.executemany(
                        _UPSERT, [_with_identity(row, self._identify) for row in rows.values()])
            except Exception:
                self._put_back(rows)
                raise
        return len(rows)

    def _put_back(self, rows: dict[str, tuple]) -> None:
        with self._lock:
            # older rows keep their place, a newer row for the same task its value
            self._pending = {**rows, **self._pending}
            self._flush_queued = True  # the retry writes them: new writes need no wake-up
            over = len(self._pending) - self._max_waiting
            if over > 0:
                ended = [task_id for task_id, row in self._pending.items()
                         if row[_STATE] in ENDED_STATES][:over]
                for task_id in ended:
                    del self._pending[task_id]
                self.dropped += len(ended)

    def _failed(self, e: Exception) -> None:
        error = _describe_error(e)
        if self.trouble is None:
            self.trouble = (error, time.time())
            self._retry_delay = RETRY_FIRST
            self._reactor.callFromThread(
                log.error, "cannot write the task history: {error}; {n} record(s) wait in memory "
                           "and are retried; HTTP tasks are refused until then",
                error=error, n=len(self._pending))
        else:
            self.trouble = (error, self.trouble[1])
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
        self._retry_at = time.monotonic() + self._retry_delay

    def _recovered(self, written: int) -> None:
        since = self.trouble[1]
        self.trouble = None
        self._reactor.callFromThread(
            log.info, "the task history is writable again after {seconds:.1f} s; wrote {n} "
                      "waiting record(s){lost}", seconds=time.time() - since, n=written,
            lost=f"; {self.dropped} were dropped meanwhile" if self.dropped else "")


def _describe_error(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return f"{text} ({e.sqlite_errorname})" if getattr(e, "sqlite_errorname", None) else text


class Store:
    """The history of every task, and the output each one wrote."""

    def __init__(self, data_dir: str | os.PathLike, reactor, max_log_bytes: int = 256 << 20,
                 keep_tcp_output: bool = False, *, identify: Identify,
                 end_left_behind: EndLeftBehind):
        """keep_tcp_output: spool TCP tasks' output too. Off, their records count the bytes
        (all reported dropped): the TCP client already has them, and a busy scheduler's
        output would double the agent's I/O and fill the disk with copies.

        identify and end_left_behind are the runner's (agent.runner.procinfo): the history
        records which process a running task is and, after a crash, has what is left of it
        ended, without knowing how processes are read or killed."""
        self._reactor = reactor
        self._identify = identify
        self._end_left_behind = end_left_behind
        self._keep_tcp_output = keep_tcp_output
        self._data_dir = Path(data_dir)
        self._output_root = str(self._data_dir / "output")
        self._max_log_bytes = max_log_bytes
        self._live: dict[str, _Live] = {}
        self._keys = KeyIndex()
        """Idempotency key (a request's id) -> the task submitted with it, for every
        task in the history: the engine asks synchronously, so a retry racing its
        first attempt still finds it."""
        self._ended_rows: dict[str, tuple] = {}
        """Rows of ended tasks whose cleanup is not known yet (at most CLEANUP_DEADLINE long)."""
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
        self.recovered = _recover(connection, self._data_dir, self._reactor.seconds(),
                                  self._end_left_behind)
        if not _take_clean_stop_mark(self._data_dir):  # the last run was killed
            _sweep_orphan_output(connection, self._data_dir / "output")
        self._keys.load(connection.execute(
            "SELECT request_id, id FROM tasks WHERE request_id IS NOT NULL "
            "AND request_id != '' ORDER BY seq"))
        retention.prepare(connection)
        self._database = _SerialDatabase(connection, self._reactor, self._identify)
        return self

    def start(self) -> None:
        """Start the store's thread; records and reads wait in its queue until then."""
        self._database.start()

    def close(self) -> Deferred:
        """Write what is pending, then close; the Deferred fires when it is on disk."""
        closed = self._database.close()
        closed.addCallback(self._mark_clean_stop)
        closed.addBoth(self._unlock)
        return closed

    def _mark_clean_stop(self, result):
        (self._data_dir / CLEAN_STOP).touch()
        return result

    def _unlock(self, result):
        os.close(self._lock_fd)
        self._lock_fd = None
        return result

    # -- fed by the engine

    def observe(self, task) -> None:
        """Engine observer: record the task as queued, running, or ended."""
        if task.state == "finished" and task.id not in self._live:
            return  # never seen queued: not a task of this store's engine
        live = self._live_entry(task)
        row = _row_of(task, live, self._reactor.seconds())
        self._database.write(task.id, row)
        if task.state == "finished":
            del self._live[task.id]
            live.output.end()
            if task.cleanup is None:
                self._ended_rows[task.id] = row

    def observe_cleanup(self, task) -> None:
        """Engine cleanup observer: add to the ended task's record whether its group was emptied.

        Usually in the same reactor turn as the end, so the write coalesces with it."""
        row = self._ended_rows.pop(task.id, None)
        if row is not None:
            self._database.write(task.id, (*row[:_CLEANUP], task.cleanup, *row[_CLEANUP + 1:]))

    def task_for_key(self, key: str) -> str | None:
        """The id of the task submitted with this idempotency key, if any."""
        return self._keys.task_for(key)

    def _forgotten(self, task_ids) -> None:
        """Tasks removed from the history (pruned or purged): their keys may be used again."""
        self._keys.forget(task_ids)

    def tap(self, task) -> TaskOutput:
        """Engine output tap: the spool the task's output goes to."""
        return self._live_entry(task).output

    def _live_entry(self, task) -> _Live:
        live = self._live.get(task.id)
        if live is None:
            if task.request.id:
                self._keys.remember(task.request.id, task.id)
            live = self._live[task.id] = _Live(
                self._reactor.seconds(), json.dumps(list(task.request.command)),
                TaskOutput(f"{self._output_root}/{task.id}", self._max_log_bytes
                           if task.source != "tcp" or self._keep_tcp_output else 0))
        return live

    # -- read by the HTTP door

    def get(self, task_id: str) -> Deferred[TaskRecord | None]:
        """The task's record; while writing fails, its newest row still waiting in memory."""
        if not TASK_ID.match(task_id):
            return succeed(None)
        d = self._database.run(_select_one, task_id)
        d.addCallback(lambda record: self._newest(task_id, record))
        return d

    def get_saved(self, task_id: str) -> Deferred[TaskRecord | None]:
        """As get, but fails with HistoryUnwritable unless the record is on disk:
        what an acknowledgement (201 Created) must wait for."""
        d = self._database.run_saved(_select_one, task_id)
        d.addCallback(lambda record: record and self._fresh(record))
        return d

    def list(self, state: str | None = None, limit: int = 100,
             cursor: str | None = None) -> Deferred[Page]:
        """Newest first; cursor is a Page.next from the page before (ValueError if it is not).

        While writing fails, rows waiting in memory replace their stale versions, and
        tasks newer than any on disk lead the first page."""
        before = _parse_cursor(cursor)
        d = self._database.run(_select_page, state, limit, before)
        d.addCallback(self._with_waiting, state, limit, before is None)
        return d

    def health(self) -> dict:
        """Whether the history can be written now; what /healthz reports."""
        database = self._database
        trouble = database.trouble if database is not None else None
        return {"writable": trouble is None, "error": trouble and trouble[0],
                "since": trouble and trouble[1],
                "waiting": database.waiting if trouble else 0,
                "dropped": database.dropped if database is not None else 0}

    def _newest(self, task_id: str, record: TaskRecord | None) -> TaskRecord | None:
        row = self._database.waiting_row(task_id)
        if row is not None:
            record = _from_row((None, *row))[1]
        return record and self._fresh(record)

    def _with_waiting(self, page: Page, state: str | None, limit: int, first: bool) -> Page:
        waiting = {row[0]: _from_row((None, *row))[1] for row in self._database.waiting_rows()}
        records = [waiting.pop(r.id, r) for r in page.records]
        records = [r for r in records if state is None or r.state == state]
        if first and waiting:
            newest = max((r.created_at for r in page.records), default=float("-inf"))
            newer = sorted((r for r in waiting.values() if r.created_at > newest
                            and (state is None or r.state == state)),
                           key=lambda r: r.created_at, reverse=True)
            records = (newer + records)[:limit]
        return Page([self._fresh(r) for r in records], page.next)

    def live_output(self, task_id: str) -> TaskOutput | None:
        live = self._live.get(task_id)
        return None if live is None else live.output

    def reader(self, task_id: str, fd: int, offset: int = 0) -> StreamReader:
        return StreamReader(self.output_dir(task_id), fd, offset, self.live_output(task_id))

    def output_dir(self, task_id: str) -> str:
        if not TASK_ID.match(task_id):
            raise ValueError(f"not a task id: {task_id!r}")
        return f"{self._output_root}/{task_id}"

    # -- retention (the policy and its SQL: agent.history.retention)

    def usage(self) -> Deferred[retention.Usage]:
        """The data dir's database files and output; queued and running tasks' from their spools."""
        live_bytes = sum(_kept(live.output) for live in self._live.values())
        d = self._database.run(retention.measure, self._data_dir, _ENDED)
        d.addCallback(lambda usage: replace(usage, output_bytes=usage.output_bytes + live_bytes))
        return d

    def ended_tasks(self, after_seq: int, limit: int,
                    finished_before: float | None = None) -> Deferred[retention.Batch]:
        """Ended tasks that may be pruned, oldest first, from after_seq on: the next batch of
        up to limit, less those this store still holds in memory."""
        d = self._database.run(retention.candidates, _ENDED, after_seq, limit, finished_before)
        d.addCallback(lambda batch: replace(batch, candidates=[
            c for c in batch.candidates if not self._held(c.id)]))
        return d

    def remove(self, task_ids: list[str]) -> Deferred[retention.Removed]:
        """Delete ended tasks and their output, never one this store still holds in memory."""
        task_ids = [task_id for task_id in task_ids if not self._held(task_id)]
        d = self._database.run(retention.remove, Path(self._output_root), _ENDED, task_ids)
        d.addCallback(self._removed)
        return d

    def compact(self) -> Deferred[int]:
        """Shrink the database files after deletions; their size after."""
        return self._database.run(retention.compact, self._data_dir)

    def purge(self, task_id: str) -> Deferred[TaskRecord | None]:
        """Delete one ended task and its output: its record as it was, None if there is no
        such task, StillRunning if it is queued or running."""
        if not TASK_ID.match(task_id):
            return succeed(None)
        if task_id in self._live:
            return fail(StillRunning(task_id))
        self._ended_rows.pop(task_id, None)  # its cleanup, due later, must not write it back
        d = self._database.run(_purge_one, Path(self._output_root), task_id)
        d.addCallbacks(self._purged, _as_unwritable)
        return d

    def _purged(self, record: TaskRecord | None) -> TaskRecord | None:
        if record is not None:
            self._forgotten([record.id])
        return record

    def _removed(self, removed: retention.Removed) -> retention.Removed:
        for task_id, why in removed.failures:
            log.error("cannot remove the output of task {id}: {why}; its record is kept",
                      id=task_id, why=why)
        if removed.ids:
            self._forgotten(removed.ids)
        return removed

    def _held(self, task_id: str) -> bool:
        """Queued, running, or ended with its record still to be completed (its cleanup)."""
        return task_id in self._live or task_id in self._ended_rows

    def _fresh(self, record: TaskRecord) -> TaskRecord:
        """A running task's byte counts move faster than its record: take them from the spool."""
        live = self._live.get(record.id)
        return record if live is None else _with_sizes(record, live.output)


def _as_unwritable(failure: Failure):
    """A write the history refused (full disk, read-only file system) says so by its type."""
    failure.trap(sqlite3.Error, OSError)
    raise HistoryUnwritable(_describe_error(failure.value))


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
    _add_missing_columns(connection)
    return connection


def _add_missing_columns(connection: sqlite3.Connection) -> None:
    present = {row[1] for row in connection.execute("PRAGMA table_info(tasks)")}
    with connection:
        for name, kind in _ADDED_COLUMNS.items():
            if name not in present:
                connection.execute(f"ALTER TABLE tasks ADD COLUMN {name} {kind}")


def _recover(connection: sqlite3.Connection, data_dir: Path, now: float,
             end_left_behind: EndLeftBehind) -> list[str]:
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
    killed = end_left_behind(groups)
    with connection:
        for task_id, state, *_ in rows:
            out, out_dropped = size_on_disk(data_dir / "output" / task_id, 1)
            err, err_dropped = size_on_disk(data_dir / "output" / task_id, 2)
            connection.execute(
                "UPDATE tasks SET state = 'lost', reason = 'lost', exit_code = -1, error = ?, "
                "finished_at = ?, "
                "stdout_bytes = ?, stdout_dropped = ?, stderr_bytes = ?, stderr_dropped = ? "
                "WHERE id = ?",
                (LOST_RUNNING if state == "running" else LOST_QUEUED, now,
                 out, out_dropped, err, err_dropped, task_id))
    log.warn("{n} task(s) were queued or running when the agent last stopped: marked lost; "
             "killed {k} process group(s) they left behind", n=len(rows), k=len(killed))
    return [row[0] for row in rows]


CLEAN_STOP = "clean-stop"
"""Written when the store closes after writing everything; taken at open. Its
absence at open means the last run was killed (or this is the first)."""


def _take_clean_stop_mark(data_dir: Path) -> bool:
    """True if the last run closed the store cleanly; either way, the mark is gone now."""
    try:
        (data_dir / CLEAN_STOP).unlink()
    except FileNotFoundError:
        return False
    return True


def _sweep_orphan_output(connection: sqlite3.Connection, output_root: Path) -> int:
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
        if not TASK_ID.match(name) or connection.execute(
                "SELECT 1 FROM tasks WHERE id = ?", (name,)).fetchone():
            continue
        try:
            freed += retention.remove_output(output_root / name)
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


_ENDED = tuple(sorted(ENDED_STATES))


def _kept(output: TaskOutput) -> int:
    (out, out_dropped), (err, err_dropped) = output.size(1), output.size(2)
    return out - out_dropped + err - err_dropped


def _purge_one(connection, output_root: Path, task_id: str) -> TaskRecord | None:
    """Store thread: the record, then its output and row gone; StillRunning if it has not ended."""
    record = _select_one(connection, task_id)
    if record is None:
        return None
    if not record.ended:
        raise StillRunning(task_id)
    removed = retention.remove(connection, output_root, _ENDED, [task_id])
    if removed.failures:
        raise OSError(f"cannot remove the output of task {task_id}: {removed.failures[0][1]}")
    return record
