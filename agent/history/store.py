"""Task history: SQLite records written off the reactor thread, and output spool files.

The store watches the engine (an observer and an output tap), so tasks from
both doors land in one history without the doors knowing about it. Every
SQL statement runs on one thread that owns the one connection, in FIFO
order; writes are coalesced per task and every read first applies the
writes still pending, so a read can never overtake a write: a task is
visible as soon as the engine has told the store about it.

Nothing above the store writes files or SQL. This module is the facade the
engine and the doors use; each job behind it has its own module: records
(the record and its row), table (schema and SQL), writer (the thread),
recovery, sweep, lock, prune (removal), spool (output files), keyindex.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from agent.history import datadir, lock, prune, table
from agent.history.keyindex import KeyIndex
from agent.history.lock import DataDirInUse
from agent.history.prune import StillRunning
from agent.history.records import (
    STATES, TASK_ID, Identify, Live, Page, TaskRecord, command_json, command_text, kept_bytes,
    record_of, row_of, state_of, with_sizes)
from agent.history.recovery import EndLeftBehind, recover
from agent.history.spool import StreamReader, TaskOutput
from agent.history.sweep import leave_clean_stop_mark, sweep_orphan_output, take_clean_stop_mark
from agent.history.writer import HistoryUnwritable, SerialDatabase, as_unwritable

__all__ = ["Store", "TaskRecord", "STATES", "HistoryUnwritable", "StillRunning", "DataDirInUse",
           "Page", "state_of"]

log = Logger()


class _RowOf:
    """A task's row as it is when called: what the store writes (agent.history.writer).
    The task's state may have moved on by then, which is the point: one row for all."""

    __slots__ = ("task", "live", "noticed_at")

    def __init__(self, task, live: Live, noticed_at: float):
        self.task, self.live, self.noticed_at = task, live, noticed_at

    def __call__(self) -> tuple:
        return row_of(self.task, self.live, self.noticed_at)


class Store:
    """The history of every task, and the output each one wrote."""

    def __init__(self, data_dir: str | os.PathLike, reactor, max_log_bytes: int = 256 << 20,
                 keep_tcp_output: bool = False, *, identify: Identify,
                 end_left_behind: EndLeftBehind, database=SerialDatabase, keep_bytes: int = 0):
        """keep_tcp_output: spool the output of TCP tasks without an id too. Off, their
        records count the bytes (all reported dropped).

        identify and end_left_behind are the runner's (agent.runner.procinfo): the history
        records which process a running task is and, after a crash, has what is left of it
        ended, without knowing how processes are read or killed.

        database: what open() runs the history's SQL with, built as
        database(connection, reactor, identify); the default has its own thread. In-memory
        tests pass one that runs each job at once (tests/history/inline.py).

        keep_bytes: --keep-bytes; health() says "full" while the output of live tasks
        alone reaches it (nothing may be pruned to make room), so no new HTTP task starts."""
        self._keep_bytes = keep_bytes
        self._new_database = database
        self._reactor = reactor
        self._identify = identify
        self._end_left_behind = end_left_behind
        self._keep_tcp_output = keep_tcp_output
        self._data_dir = Path(data_dir)
        self._output_root = str(self._data_dir / "output")
        self._max_log_bytes = max_log_bytes
        self._live: dict[str, Live] = {}
        self._keys = KeyIndex()
        """Idempotency key (a request's id) -> the task submitted with it, for every
        task in the history: the engine asks synchronously, so a retry racing its
        first attempt still finds it."""
        self._ended_rows: dict[str, _RowOf] = {}
        """Rows of ended tasks whose cleanup is not known yet (at most CLEANUP_DEADLINE long)."""
        self._lock_fd: int | None = None
        self._database: SerialDatabase | None = None
        self.recovered: list[str] = []
        self.last_usage: prune.Usage | None = None
        """What usage() measured last (retention asks after tasks end and every prune):
        what the metrics report, since measuring blocks and a scrape must not."""

    # -- lifecycle

    def open(self) -> Store:
        """Take the data dir, open the history and recover from a crash.

        Blocking, once, before the agent serves anything (twistd calls it from
        privilegedStartService); DataDirInUse if another agent has it.
        """
        datadir.prepare(self._data_dir)
        self._lock_fd = lock.take(self._data_dir / "lock")
        database = self._data_dir / "history.sqlite3"
        for path in (database, *(database.with_name(database.name + s) for s in ("-wal", "-shm"))):
            if path == database or path.exists():
                datadir.private_file(path)
        datadir.private_subdir(Path(self._output_root))
        connection = table.connect(database)
        self.recovered = recover(connection, Path(self._output_root), self._reactor.seconds(),
                                 self._end_left_behind)
        if not take_clean_stop_mark(self._data_dir):  # the last run was killed
            sweep_orphan_output(connection, Path(self._output_root))
        self._keys.load(table.idempotency_keys(connection))
        prune.prepare(connection)
        self._database = self._new_database(connection, self._reactor, self._identify)
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
        leave_clean_stop_mark(self._data_dir)
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
        row = _RowOf(task, live, self._reactor.seconds())
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
            self._database.write(task.id, row)  # its row now says task.cleanup

    def task_for_key(self, key: str) -> str | None:
        """The id of the task submitted with this idempotency key, if any."""
        return self._keys.task_for(key)

    def _forgotten(self, task_ids) -> None:
        """Tasks removed from the history (pruned or purged): their keys may be used again."""
        self._keys.forget(task_ids)

    def tap(self, task) -> TaskOutput:
        """Engine output tap: the spool the task's output goes to."""
        return self._live_entry(task).output

    def _keeps_output_of(self, task) -> bool:
        """Every HTTP task's output; a TCP task's only with an id (a retry of that id gets
        the same result back) or with keep_tcp_output: without an id the client already
        has its output, and a busy scheduler's copies would double the agent's I/O."""
        return task.source != "tcp" or task.request.id is not None or self._keep_tcp_output

    def _live_entry(self, task) -> Live:
        live = self._live.get(task.id)
        if live is None:
            if task.request.id:
                self._keys.remember(task.request.id, task.id)
            live = self._live[task.id] = Live(
                self._reactor.seconds(), task.request.command,
                TaskOutput(f"{self._output_root}/{task.id}", self._max_log_bytes
                           if self._keeps_output_of(task) else 0))
        return live

    # -- read by the HTTP door

    def get(self, task_id: str) -> Deferred[TaskRecord | None]:
        """The task's record; while writing fails, its newest row still waiting in memory."""
        if not TASK_ID.match(task_id):
            return succeed(None)
        d = self._database.run(table.select_one, task_id)
        d.addCallback(lambda record: self._newest(task_id, record))
        return d

    def get_saved(self, task_id: str) -> Deferred[TaskRecord | None]:
        """As get, but fails with HistoryUnwritable unless the record is on disk:
        what an acknowledgement (201 Created) must wait for."""
        d = self._database.run_saved(table.select_one, task_id)
        d.addCallback(lambda record: record and self._fresh(record))
        return d

    def list(self, state: str | None = None, limit: int = 100, cursor: str | None = None,
             source: str | None = None, contains: str | None = None) -> Deferred[Page]:
        """Newest first; cursor is a Page.next from the page before (ValueError if it is not);
        source (tcp, http) and contains (text of the command) narrow it.

        While writing fails, rows waiting in memory replace their stale versions, and
        tasks newer than any on disk lead the first page."""
        before = table.parse_cursor(cursor)
        d = self._database.run(table.select_page, state, limit, before, table.PAGE_BYTES, source,
                               contains)
        wanted = (lambda r: (state is None or r.state == state)
                  and (source is None or r.source == source)
                  and (not contains or command_text(contains) in command_json(r.command)))
        d.addCallback(self._with_waiting, wanted, limit, before is None)
        return d

    def health(self) -> dict:
        """Whether the history can be written now; what /healthz reports."""
        database = self._database
        trouble = database.trouble if database is not None else None
        return {"writable": trouble is None, "error": trouble and trouble[0],
                "full": self._keep_bytes > 0 and self._live_bytes() >= self._keep_bytes,
                "since": trouble and trouble[1],
                "waiting": database.waiting if trouble else 0,
                "dropped": database.dropped if database is not None else 0}

    def _newest(self, task_id: str, record: TaskRecord | None) -> TaskRecord | None:
        row = self._database.waiting_row(task_id)
        if row is not None:
            record = record_of(row)
        return record and self._fresh(record)

    def _with_waiting(self, page: Page, wanted, limit: int, first: bool) -> Page:
        waiting = {row[0]: record_of(row) for row in self._database.waiting_rows()}
        records = [waiting.pop(r.id, r) for r in page.records]
        records = [r for r in records if wanted(r)]
        if first and waiting:
            newest = max((r.created_at for r in page.records), default=float("-inf"))
            newer = sorted((r for r in waiting.values() if r.created_at > newest and wanted(r)),
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

    # -- retention (the policy: agent.history.retention; what blocks: agent.history.prune)

    def usage(self) -> Deferred[prune.Usage]:
        """The data dir's database files and output; queued and running tasks' from their spools."""
        live_bytes = self._live_bytes()
        d = self._database.run(prune.measure, self._data_dir)
        d.addCallback(lambda usage: replace(usage, output_bytes=usage.output_bytes + live_bytes))
        d.addCallback(self._remember_usage)
        return d

    def _remember_usage(self, usage: prune.Usage) -> prune.Usage:
        self.last_usage = usage
        return usage

    def _live_bytes(self) -> int:
        """What queued and running tasks' spools hold on disk now."""
        return sum(kept_bytes(live.output) for live in self._live.values())

    def ended_tasks(self, after_seq: int, limit: int,
                    finished_before: float | None = None) -> Deferred[prune.Batch]:
        """Ended tasks that may be pruned, oldest first, from after_seq on: the next batch of
        up to limit, less those this store still holds in memory."""
        d = self._database.run(prune.candidates, after_seq, limit, finished_before)
        d.addCallback(lambda batch: replace(batch, candidates=[
            c for c in batch.candidates if not self._held(c.id)]))
        return d

    def remove(self, task_ids: list[str]) -> Deferred[prune.Removed]:
        """Delete ended tasks and their output, never one this store still holds in memory."""
        task_ids = [task_id for task_id in task_ids if not self._held(task_id)]
        d = self._database.run(prune.remove, Path(self._output_root), task_ids)
        d.addCallback(self._removed)
        return d

    def compact(self) -> Deferred[int]:
        """Shrink the database files after deletions; their size after."""
        return self._database.run(prune.compact, self._data_dir)

    def purge(self, task_id: str) -> Deferred[TaskRecord | None]:
        """Delete one ended task and its output: its record as it was, None if there is no
        such task, StillRunning if it is queued or running."""
        if not TASK_ID.match(task_id):
            return succeed(None)
        if task_id in self._live:
            return fail(StillRunning(task_id))
        self._ended_rows.pop(task_id, None)  # its cleanup, due later, must not write it back
        d = self._database.run(prune.purge_one, Path(self._output_root), task_id)
        d.addCallbacks(self._purged, as_unwritable)
        return d

    def _purged(self, record: TaskRecord | None) -> TaskRecord | None:
        if record is not None:
            self._forgotten([record.id])
        return record

    def _removed(self, removed: prune.Removed) -> prune.Removed:
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
        return record if live is None else with_sizes(record, live.output)
