"""Task endpoints: start, run to completion, list, show, cancel, health.

Handlers translate HTTP into engine and store calls and records into JSON;
the rules (limits, cancel, states) live in the engine and the store.
"""
from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any, Mapping

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from agent._twisted_compat import client_gone
from agent.core.allowlist import NotAllowed
from agent.core.decisions import (Attached, Busy, Decision, HistoryDown, HistoryFull, KeyConflict,
                                  KeyForgotten, Replay, ShuttingDown, Started)
from agent.core.engine import Engine
from agent.core.request import for_log
from agent.core.lanes import Lane
from agent.core.task import Task
from agent.history.store import STATES, HistoryUnwritable, StillRunning, Store, TaskRecord
from agent.doors.http.body import TaskSpec, header_key, parse_task, read_json
from agent.doors.http.auth import Principal, require
from agent.doors.http.errors import (ApiError, BadRequest, Conflict, Forbidden, InsufficientStorage,
                                     NotFound, TooManyTasks,
                                     Unavailable, Unprocessable)
from agent.doors.http.output import OutputStreamer
from agent.doors.http.query import arg, choice_arg, int_arg
from agent.doors.http.router import STREAMING, Response

log = Logger()

REPLAYED = b"Idempotent-Replayed"

_REFUSALS = (NotAllowed, Busy, ShuttingDown, HistoryDown, HistoryFull, KeyConflict, KeyForgotten)
"""Admission's refusals, each answered as an HTTP error by TaskEndpoints._as_error."""
"""Set on an answer about a task an earlier request with the same key started."""

SOURCES = ("tcp", "http")
"""The doors a record's source names (?source= filters by it)."""
MAX_SEARCH = 200
"""Longest ?q= (text the command holds)."""

DEFAULT_PAGE = 50
MAX_PAGE = 1000


class Discard:
    """The HTTP door's own sink: output goes to the store's spool (an engine tap), not memory."""

    def received(self, fd: int, data: bytes) -> None:
        pass


def task_json(record: TaskRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "command": list(record.command),
        "state": record.state,
        "source": record.source,
        "created_at": _time(record.created_at),
        "started_at": _time(record.started_at),
        "finished_at": _time(record.finished_at),
        "duration_ms": None if record.duration_ms is None else round(record.duration_ms, 3),
        "exit_code": record.exit_code,
        "error": record.error,
        "pid": record.pid,
        "timeout": record.timeout,
        "stdout_bytes": record.stdout_bytes,
        "stderr_bytes": record.stderr_bytes,
        "stdout_dropped": record.stdout_dropped,
        "stderr_dropped": record.stderr_dropped,
        "request_id": record.request_id,
        "reason": record.reason,
        "signal": record.signal,
        "cleanup": record.cleanup,
        "launched_by": record.launched_by,
        "command_cut": record.command_cut,
    }


def _replayed(record: TaskRecord) -> Response:
    """200: the task an earlier request with the same key started."""
    return Response(200, task_json(record), {b"Location": b"/tasks/" + record.id.encode(),
                                             REPLAYED: b"true"})


def _time(seconds: float | None) -> str | None:
    """RFC 3339 in UTC with milliseconds."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


class TaskEndpoints:
    def __init__(self, engine: Engine, store: Store, lane: Lane, kill_grace: float = 5.0,
                 environ: Mapping[str, str] = os.environ):
        self._engine = engine
        self._store = store
        self._lane = lane
        self._kill_grace = kill_grace
        self._environ = environ

    # -- starting

    def create(self, request) -> Deferred:
        """201 with the record as the history has it: what a GET right after will show.

        A repeated id (Idempotency-Key) starts nothing: 200 with the task it named."""
        decided = self._admit(request, held=False)
        decided.addCallback(self._created)
        return decided

    def _created(self, decision: Decision) -> Deferred:
        if isinstance(decision, Replay):
            return _replayed(decision.record)
        if isinstance(decision, Attached):
            return self._store.get(decision.task.id).addCallback(_replayed)
        task = decision.task
        created = self._store.get_saved(task.id)
        created.addCallbacks(
            lambda record: Response(201, task_json(record),
                                    {b"Location": b"/tasks/" + task.id.encode()}),
            self._not_saved, errbackArgs=(task,))
        return created

    def _not_saved(self, failure, task: Task):
        """Never 201 for a task whose record is not on disk: end it and say why."""
        failure.trap(HistoryUnwritable)
        task.cancel("the task history cannot be written")
        raise Unavailable(_unwritable(failure.value))

    def run(self, request) -> Deferred:
        """Run to completion, then answer with stdout as text; a client that leaves cancels it
        (unless a retry of the same id still waits for it)."""
        decided = self._admit(request, held=True)
        decided.addCallback(self._run, request)
        return decided

    def _run(self, decision: Decision, request) -> Deferred:
        if isinstance(decision, Replay):
            return self._send_stdout(decision.record, request, replayed=True)
        task = decision.task
        gone = request.notifyFinish()
        gone.addErrback(lambda _: self._engine.release_many([task], "client disconnected"))
        ended = task.ended()
        ended.addCallback(lambda _: self._store.get(task.id))
        ended.addCallback(self._send_stdout, request, isinstance(decision, Attached))
        return ended

    def _send_stdout(self, record: TaskRecord, request, replayed: bool = False):
        if client_gone(request):
            return STREAMING
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"X-Task-Id", record.id.encode())
        request.setHeader(b"X-Exit-Code", b"%d" % record.exit_code)
        request.setHeader(b"X-Task-State", record.state.encode())
        if record.error:
            request.setHeader(b"X-Error", _header_safe(record.error))
        if replayed:
            request.setHeader(REPLAYED, b"true")
            request.setHeader(b"X-Stdout-Dropped", b"%d" % record.stdout_dropped)
        OutputStreamer(request, {1: self._store.reader(record.id, 1)},
                       limits={1: record.stdout_bytes}).start()
        return STREAMING

    def _admit(self, request, held: bool) -> Deferred[Decision]:
        spec = parse_task(read_json(request), header_key(request))
        principal = request.principal
        decided = self._engine.admit(spec.request, self._lane, Discard(), "http", held=held,
                                     durable=True, launched_by=principal.launched_by,
                                     **spec.run_options(self._environ))
        decided.addCallbacks(self._log_start, self._refused, errbackArgs=(spec,))
        decided.addCallback(self._may_read, principal, held)
        return decided

    def _may_read(self, decision: Decision, principal: Principal, held: bool) -> Decision:
        """A key names an earlier task: its record and output go only to a caller who may
        read tasks, or who launched that one."""
        if isinstance(decision, Started) or principal.allows("read"):
            return decision
        known = decision.record if isinstance(decision, Replay) else decision.task
        if known.launched_by == principal.launched_by:
            return decision
        if held and isinstance(decision, Attached):
            self._engine.release_many([decision.task], "client disconnected")
        raise Forbidden(f"the key names a task that the token {principal.name!r} did not start "
                        "and may not read (it lacks the scope 'read')")

    @staticmethod
    def _log_start(decision: Decision) -> Decision:
        if isinstance(decision, Started):
            log.info("task {id} started over HTTP: {argv0}", id=decision.task.id,
                     argv0=for_log(decision.task.request.command[0]))
        return decision

    def _refused(self, failure, spec: TaskSpec):
        """Each refusal as its HTTP error (the router maps those to statuses), caused by
        the refusal: admission counted it already, the router must not count it again."""
        failure.trap(*_REFUSALS)
        raise self._as_error(failure) from failure.value

    def _as_error(self, failure) -> ApiError:
        refusal = failure.check(*_REFUSALS)
        if refusal is HistoryFull:
            return InsufficientStorage(failure.value.message)
        if refusal is NotAllowed:
            return Forbidden(failure.value.message)
        if refusal is Busy:
            return TooManyTasks(f"{self._lane.limit} HTTP tasks are already running "
                                "(--max-running); wait for one to end or cancel one")
        if refusal is ShuttingDown:
            return Unavailable(failure.value.message)
        if refusal is HistoryDown:
            return Unavailable(_unwritable(failure.value.error))
        if refusal is KeyConflict:
            return Unprocessable(failure.value.message)
        return Conflict(failure.value.message)

    # -- reading

    def list(self, request) -> Deferred:
        state = arg(request, "state")
        if state is not None and state not in STATES:
            raise BadRequest(f"state must be one of {', '.join(STATES)}, not {state!r}")
        limit = int_arg(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        source = choice_arg(request, "source", SOURCES + ("any",), "any")
        contains = arg(request, "q")
        if contains is not None and len(contains) > MAX_SEARCH:
            raise BadRequest(f"q must be at most {MAX_SEARCH} characters, not {len(contains)}")
        try:
            page = self._store.list(state, limit, arg(request, "cursor"),
                                    None if source == "any" else source, contains or None)
        except ValueError as e:
            raise BadRequest(f"cursor: {e}") from None
        page.addCallback(lambda p: Response(200, {"tasks": [task_json(r) for r in p.records],
                                                  "next": p.next}))
        return page

    @inlineCallbacks
    def show(self, request, id: str):
        record = yield self._record(id)
        return Response(200, task_json(record))

    def health(self, request) -> Response:
        """200 even when degraded: restarting the agent (what a failing liveness probe
        does) would kill its running tasks and not free the disk."""
        running = sum(1 for task in self._engine.live.values() if task.state == "running")
        history = self._store.health()
        history["since"] = _time(history["since"])
        return Response(200, {"status": "ok" if history["writable"] else "degraded",
                              "running": running, "history": history})

    # -- ending

    @inlineCallbacks
    def cancel(self, request, id: str):
        """SIGTERM the group, SIGKILL after the grace; answer with the ended record."""
        task = self._engine.live.get(id)
        if task is None:
            record = yield self._record(id)
            raise Conflict(f"task {id} has already ended ({record.state}); nothing to cancel")
        log.info("task {id} cancelled over HTTP", id=id)
        task.cancel("cancelled by request", self._kill_grace)
        yield task.cleaned()  # the answer can say the group was verified empty
        record = yield self._record(id)
        return Response(200, task_json(record))

    def delete(self, request, id: str):
        """DELETE /tasks/{id}: a cancel; with ?purge=true, the removal of an ended task."""
        if choice_arg(request, "purge", ("true", "false"), "false") == "false":
            return self.cancel(request, id)
        require(request.principal, "purge")
        return self.purge(request, id)

    @inlineCallbacks
    def purge(self, request, id: str):
        """Remove an ended task's record and output; answer with the record removed."""
        try:
            record = yield self._store.purge(id)
        except StillRunning:
            raise Conflict(f"task {id} has not ended; cancel it first (DELETE /tasks/{id}), "
                           "then purge it") from None
        except HistoryUnwritable as e:
            raise Unavailable(f"the task history cannot be written ({e}); nothing was purged") \
                from None
        if record is None:
            raise NotFound(f"no task with id {id!r}")
        log.info("task {id} purged over HTTP", id=id)
        return Response(200, task_json(record))

    @inlineCallbacks
    def _record(self, task_id: str):
        record = yield self._store.get(task_id)
        if record is None:
            raise NotFound(f"no task with id {task_id!r}")
        return record


def _unwritable(error) -> str:
    return (f"the task history cannot be written ({error}); no task is started until it can "
            "be (see GET /healthz)")


def _header_safe(text: str) -> bytes:
    """One line of ASCII: a header value cannot carry newlines or arbitrary bytes."""
    return text.replace("\r", " ").replace("\n", " ").encode("ascii", "backslashreplace")
