"""The fleet over a fleet agent's HTTP door: its nodes, its tasks (list, show with every
attempt, submit, cancel).

Handlers translate HTTP into the fleet store's functions (agent.fleet.tasks, nodes), each
run on the HTTP door's own fleet Database (its own connection and thread: never the
reactor's, and never the FleetDoor's claims or heartbeats), and the store's values into
JSON. The rules (keys, attach or conflict, cancel, fencing) live in the store. Without
--fleet there is no Database, and every fleet path answers 404 saying so.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from agent.core.request import InvalidRequest, for_log, task_id
from agent.doors.http.body import read_json
from agent.doors.http.errors import (BadRequest, Conflict, Forbidden, NotFound, Unavailable,
                                     Unprocessable)
from agent.doors.http.query import arg, int_arg
from agent.doors.http.router import Response
from agent.doors.http.tasks import REPLAYED
from agent.fleet import nodes, tasks
from agent.fleet.database import Database, Unavailable as DatabaseUnavailable
from agent.fleet.records import STATES, FleetTask, Node
from agent.fleet.submissions import MAX_KEY, submission_from

log = Logger()

NOT_IN_A_FLEET = "this agent is not in a fleet (--fleet)"
DEFAULT_PAGE = 50
MAX_PAGE = 1000
MAX_SEQ = (1 << 63) - 1
"""The largest cursor: a fleet task's seq is a PostgreSQL bigserial."""


class FleetEndpoints:
    def __init__(self, database: Database | None):
        """database: the HTTP door's connection to the fleet; None when not in a fleet."""
        self._database = database

    # -- reading

    def nodes(self, request) -> Deferred:
        d = self._run(_nodes_and_now)
        d.addCallback(lambda found: Response(200, {"nodes": [node_json(node, found[1])
                                                             for node in found[0]]}))
        return d

    def list(self, request) -> Deferred:
        self._db()
        state = arg(request, "state")
        if state is not None and state not in STATES:
            raise BadRequest(f"state must be one of {', '.join(STATES)}, not {state!r}")
        node = arg(request, "node")
        if node is not None and not _is_key(node):
            raise BadRequest("node must be a node id (1 to 1024 characters, no control "
                             "characters)")
        limit = int_arg(request, "limit", DEFAULT_PAGE, 1, MAX_PAGE)
        before = None if arg(request, "cursor") is None else int_arg(request, "cursor", 0, 0,
                                                                     MAX_SEQ)
        d = self._run(tasks.list_tasks, state=state, node=node, before=before, limit=limit + 1,
                      tails=False)
        d.addCallback(_page, limit)
        return d

    def show(self, request, key: str) -> Deferred:
        self._db()
        d = self._run(_view, _known(key))
        d.addCallback(_found, key)
        d.addCallback(lambda view: Response(200, task_json(*view)))
        return d

    # -- submitting

    def submit(self, request) -> Deferred:
        """201 with the new task; 200 with the task its key already named, if the command is
        the same (attached: nothing new queued); 409 if it is another command."""
        self._db()
        body = read_json(request)
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object (a fleet task)")
        try:
            submission = submission_from(body)
        except InvalidRequest as e:
            raise Unprocessable(e.message) from None
        principal = request.principal
        d = self._run(_submit, submission, principal.launched_by)
        d.addErrback(_conflict)
        d.addCallback(self._submitted, principal)
        return d

    @staticmethod
    def _submitted(answer, principal) -> Response:
        (task, http), created = answer
        location = {b"Location": location_of(task.key).encode("ascii")}
        if created:
            log.info("fleet task {key} submitted over HTTP by {who}: {argv0}",
                     key=for_log(task.key), who=principal.launched_by,
                     argv0=for_log(task.command[0]))
            return Response(201, task_json(task, http), location)
        if not principal.allows("read") and task.submitted_by != principal.launched_by:
            raise Forbidden(f"the key names a fleet task that the token {principal.name!r} "
                            "did not submit and may not read (it lacks the scope 'read')")
        return Response(200, task_json(task, http), {**location, REPLAYED: b"true"})

    # -- cancelling

    def cancel(self, request, key: str) -> Deferred:
        """202 while its node has yet to end it (running); 200 once it has ended (a queued
        task is cancelled at once; an ended one is left as it was)."""
        self._db()
        d = self._run(_cancel, _known(key))
        d.addCallback(_found, key)
        d.addCallback(self._cancelled)
        return d

    @staticmethod
    def _cancelled(view) -> Response:
        task, http = view
        log.info("fleet task {key}: cancel asked over HTTP (now {state})",
                 key=for_log(task.key), state=task.state)
        return Response(202 if task.state == "running" else 200, task_json(task, http))

    # -- the database

    def _db(self) -> Database:
        if self._database is None:
            raise NotFound(NOT_IN_A_FLEET)
        return self._database

    def _run(self, f, *args, **kwargs) -> Deferred:
        """f(connection, ...) on the door's fleet connection; 503 when it cannot be reached."""
        d = self._db().run(f, *args, **kwargs)
        d.addErrback(_unreachable)
        return d


def _unreachable(failure):
    failure.trap(DatabaseUnavailable)
    raise Unavailable(f"the fleet database cannot be reached ({failure.value}); "
                      "try again later") from None


def _conflict(failure):
    failure.trap(tasks.FleetKeyConflict)
    raise Conflict(str(failure.value)) from None


def _known(key: str) -> str:
    """The key; 404 at once for one no fleet task can have (control characters, too long),
    which the database is not asked about."""
    if not (_is_key(key) and len(key) <= MAX_KEY):
        raise NotFound(f"no fleet task with key {key!r}")
    return key


def _is_key(text: str) -> bool:
    try:
        return task_id(text) is not None
    except InvalidRequest:
        return False


def _found(view, key: str):
    if view is None:
        raise NotFound(f"no fleet task with key {key!r}")
    return view


# -- what runs on the door's fleet connection (its thread)

def _nodes_and_now(conn) -> tuple[list[Node], datetime]:
    found = nodes.list_nodes(conn)
    return found, nodes.database_now(conn)  # read after: no heartbeat seen is newer


def _view(conn, key: str) -> tuple[FleetTask, str | None] | None:
    """The task with its attempts, and the HTTP address of the node that holds its output."""
    task = tasks.get(conn, key)
    if task is None:
        return None
    node = None
    if task.node_id is not None and task.local_task_id is not None:
        node = nodes.get(conn, task.node_id)
    return task, None if node is None else node.http


def _submit(conn, submission, submitted_by: str):
    """((task, its node's HTTP address), created): an attached task as GET shows it."""
    task, created = tasks.submit(conn, submission, submitted_by)
    if created:
        return (task, None), True
    return _view(conn, task.key) or (task, None), False


def _cancel(conn, key: str):
    if tasks.cancel(conn, key) is None:
        return None
    return _view(conn, key)


# -- JSON

def _page(found: list[FleetTask], limit: int) -> Response:
    more = len(found) > limit
    page = found[:limit]
    return Response(200, {"tasks": [summary_json(task) for task in page],
                          "next": str(page[-1].seq) if more else None})


def location_of(key: str) -> str:
    return "/fleet/tasks/" + path_segment(key)


def path_segment(key: str) -> str:
    """The key as one path segment: every character but letters, digits and -_.~
    percent-encoded (a slash too), and '.' or '..' spelled out, which clients would
    otherwise take for a path step."""
    segment = quote(key, safe="")
    return segment.replace(".", "%2E") if segment in (".", "..") else segment


def node_json(node: Node, now: datetime) -> dict[str, Any]:
    return {
        "id": node.node_id,
        "state": node.state,
        "labels": node.labels,
        "parallel": node.parallel,
        "running": node.running,
        "generation": node.generation,
        "http": node.http,
        "started_at": _time(node.started_at),
        "heartbeat_at": _time(node.heartbeat_at),
        "heartbeat_age": round(max(0.0, (now - node.heartbeat_at).total_seconds()), 3),
        "lease_until": _time(node.lease_until),
        "ended_at": _time(node.ended_at),
    }


def summary_json(task: FleetTask) -> dict[str, Any]:
    """A task as a listing shows it: without its output's tails and its attempts."""
    return {
        "key": task.key,
        "state": task.state,
        "command": list(task.command),
        "timeout": task.timeout,
        "limits": task.limits,
        "labels": task.labels,
        "attempt": task.attempt,
        "max_attempts": task.max_attempts,
        "node_id": task.node_id,
        "local_task_id": task.local_task_id,
        "submitted_by": task.submitted_by,
        "submitted_at": _time(task.submitted_at),
        "started_at": _time(task.started_at),
        "ended_at": _time(task.ended_at),
        "cancel_requested_at": _time(task.cancel_requested_at),
        "ending": task.ending,
        "exit_code": task.exit_code,
        "error": task.error,
        "duration_ms": None if task.duration_ms is None else round(task.duration_ms, 3),
        "stdout_bytes": task.stdout_bytes,
        "stderr_bytes": task.stderr_bytes,
    }


def task_json(task: FleetTask, http: str | None) -> dict[str, Any]:
    """The whole record: the summary, the tails of its output as text, where the whole
    output is, and every attempt."""
    return {
        **summary_json(task),
        "stdout_tail": _text(task.stdout_tail),
        "stderr_tail": _text(task.stderr_tail),
        "output": output_json(task, http),
        "attempts": [{"attempt": a.attempt, "node_id": a.node_id,
                      "started_at": _time(a.started_at), "ended_at": _time(a.ended_at),
                      "ending": a.ending, "exit_code": a.exit_code, "why": a.why}
                     for a in task.attempts],
    }


def output_json(task: FleetTask, http: str | None) -> dict[str, Any] | None:
    """Where the whole output of the attempt that reported is: on its node, as that node's
    local task; with a URL when the node gave its HTTP door's address (--fleet-url)."""
    if task.node_id is None or task.local_task_id is None:
        return None
    url = None
    if http:
        url = f"{http.rstrip('/')}/tasks/{quote(task.local_task_id, safe='')}/output"
    return {"node_id": task.node_id, "local_task_id": task.local_task_id, "url": url}


def _text(tail: bytes | None) -> str | None:
    """A tail as text; it may begin inside a character, which becomes U+FFFD."""
    return None if tail is None else tail.decode("utf-8", "replace")


def _time(moment: datetime | None) -> str | None:
    """RFC 3339 in UTC with milliseconds, as the task records have it."""
    if moment is None:
        return None
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")
