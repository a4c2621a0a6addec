"""The history's one database thread: writes coalesced per task, retried while the disk refuses.

SQLite blocks, so no statement runs on the reactor. One thread owns the one
connection and takes jobs in FIFO order; a read first applies the writes
made before it, so a read can never overtake a write.

A write is a function that makes the task's row, called on the reactor when
the writes of the last WRITE_DELAY are handed to the thread, or at once when
a read needs them: a task that is queued, started and ended within that time
has its row made once, not three times.
"""
from __future__ import annotations

import queue
import signal
import sqlite3
import threading
import time
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from agent.history import table
from agent.history.records import Identify, row_has_ended, with_identity

log = Logger()

WRITE_DELAY = 0.01
"""Seconds a record may wait to be written with the ones after it: one row made
per task and one transaction per burst, instead of a row, a thread hand-off and
a commit per change. A read never waits for it (it applies pending writes first)."""

Row = Callable[[], tuple]
"""What a write gives: makes the task's row as it is when called (on the reactor)."""


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


class SerialDatabase:
    """One connection used by one thread; writes coalesce per task, reads apply them first.

    The thread takes jobs (reads, flushes, close) from a FIFO queue; a write
    only fills a dict on the reactor and, if none is due, arms a hand-over
    WRITE_DELAY later, which makes the rows and queues one flush for them all
    (a read hands them over first). A write that fails puts its rows back (a
    newer row for the same task wins) and is retried with back-off; reads go on
    meanwhile, and the Store lays waiting rows over them.
    """

    _FLUSH = object()
    _CLOSE = object()

    def __init__(self, connection: sqlite3.Connection, reactor, identify: Identify,
                 write_delay: float = WRITE_DELAY, max_waiting: int = MAX_WAITING):
        self._connection = connection
        self._reactor = reactor
        self._identify = identify
        self._write_delay = write_delay
        self._max_waiting = max_waiting
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._unmade: dict[str, Row] = {}
        """Writes not handed to the thread yet, their rows not made: the reactor's alone."""
        self._hand_over_call = None
        self._pending: dict[str, tuple] = {}
        """Rows handed over and not yet written, shared with the thread (under _lock)."""
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

    def write(self, task_id: str, row: Row) -> None:
        """Cheap on the reactor thread: a dict entry, and a timer when none is armed.
        row() is called later, on the reactor: the task as it is then is written."""
        self._unmade[task_id] = row
        if self._hand_over_call is None:
            self._hand_over_call = self._later(self._hand_over)

    def _later(self, hand_over: Callable[[], None]):
        """Arm the hand-over; the IDelayedCall (a test double may hand over at once)."""
        return self._reactor.callLater(self._write_delay, hand_over)

    def _hand_over(self) -> None:
        """On the reactor: make the rows written since the last hand-over, and queue
        one flush for them (unless one is queued already)."""
        call, self._hand_over_call = self._hand_over_call, None
        if call is not None and call.active():
            call.cancel()
        if not self._unmade:
            return
        unmade, self._unmade = self._unmade, {}
        rows = {task_id: make() for task_id, make in unmade.items()}
        with self._lock:
            self._pending.update(rows)
            wake, self._flush_queued = not self._flush_queued, True
        if wake:
            self._submit(self._FLUSH)

    def waiting_row(self, task_id: str) -> tuple | None:
        """The newest row for the task not yet written, if any."""
        make = self._unmade.get(task_id)
        return make() if make is not None else self._pending.get(task_id)

    def waiting_rows(self) -> list[tuple]:
        self._hand_over()
        with self._lock:
            return list(self._pending.values())

    @property
    def waiting(self) -> int:
        """How many rows wait to be written, without copying them."""
        return len(self._pending) + len(self._unmade)

    def run(self, query, *args) -> Deferred:
        """query(connection, *args) on the store thread, after every write made before
        (or after trying them, while writing fails)."""
        self._hand_over()
        done: Deferred = Deferred()
        self._submit((done, query, args))
        return done

    def run_saved(self, query, *args) -> Deferred:
        """As run, but fails with HistoryUnwritable unless every earlier write is on disk."""
        return self.run(self._saved, query, *args)

    def close(self) -> Deferred:
        """Write what is pending, close the connection, end the thread."""
        self._hand_over()
        closed: Deferred = Deferred()
        self._submit((closed, self._CLOSE, ()))
        closed.addBoth(self._join)
        return closed

    def _submit(self, job) -> None:
        """Hand a job to the store thread. The one way in: a test double (an inline
        database, tests/history/inline.py) runs the job at once instead."""
        self._jobs.put(job)

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
            if job is self._FLUSH:  # the rows waited on the reactor (write): now, at once
                self._try_flush()
                job = None
                continue
            if self._answer_job(job):
                return
            job = None

    def _answer_job(self, job) -> bool:
        """Run a read or a close and answer its Deferred; True once the connection is closed."""
        done, query, args = job
        if query is self._CLOSE:
            self._answer(done, self._close)
            return True
        self._answer(done, self._query, query, *args)
        return False

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
                           "{error}", n=len(self._pending), error=describe_error(e))
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
                table.upsert(self._connection,
                             [with_identity(row, self._identify) for row in rows.values()])
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
                         if row_has_ended(row)][:over]
                for task_id in ended:
                    del self._pending[task_id]
                self.dropped += len(ended)

    def _failed(self, e: Exception) -> None:
        error = describe_error(e)
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


def describe_error(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return f"{text} ({e.sqlite_errorname})" if getattr(e, "sqlite_errorname", None) else text


def as_unwritable(failure: Failure):
    """Errback: a write the history refused (full disk, read-only file system) says so by its type."""
    failure.trap(sqlite3.Error, OSError)
    raise HistoryUnwritable(describe_error(failure.value))
