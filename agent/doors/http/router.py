"""Paths to handlers, and every outcome of a handler to an HTTP response, in one place.

A handler takes the request (and the path's {parameters}) and returns a
Response, a Deferred of one, or STREAMING when it writes the body itself.
An ApiError becomes its status with {"error": message}; anything else is
logged and becomes a bare 500, never a traceback.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import unquote

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from agent._twisted_compat import client_gone
from agent.core.decisions import Refused
from agent.doors.http.auth import Principal, require
from agent.doors.http.errors import ApiError, MethodNotAllowed, NotFound

log = Logger()

STREAMING = object()
"""A handler's answer when it has taken over writing the response."""


@dataclass(frozen=True)
class Response:
    status: int = 200
    body: Any = None
    """A JSON-able value, or bytes sent as they are."""
    headers: dict[bytes, bytes] = field(default_factory=dict)
    content_type: bytes = b"application/json"


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str
    """A path with {name} segments, e.g. /tasks/{id}/output."""
    handler: Callable[..., Any]
    scope: str | None = "read"
    """What the caller's token must allow (agent.doors.http.auth.SCOPES); None: no token."""

    @property
    def auth(self) -> bool:
        return self.scope is not None

    def match(self, segments: list[str]) -> dict[str, str] | None:
        parts = self.pattern.strip("/").split("/")
        if len(parts) != len(segments):
            return None
        params = {}
        for part, segment in zip(parts, segments):
            if part.startswith("{"):
                params[part[1:-1]] = segment
            elif part != segment:
                return None
        return params


class Router(Resource):
    """The whole API as one leaf resource: it routes on the path itself."""

    isLeaf = True

    def __init__(self, routes: list[Route], authorize: Callable[[Any], Principal],
                 refused: Callable[[str], None] = lambda reason: None):
        """refused(reason): told of each request the door itself refuses (a bad request,
        no token); admission's refusals are counted by the engine, not here."""
        super().__init__()
        self.routes = routes
        self._authorize = authorize
        self._refused = refused

    def render(self, request):
        request.setHeader(b"Server", b"agent")  # not Twisted's name and version
        try:
            if not self._open(request):  # before any lookup: no 404/405 map of the API for strangers
                request.principal = self._authorize(request)
            route, params = self._route(request)
            if route.auth:
                require(request.principal, route.scope)
            result = route.handler(request, **params)
        except Exception:
            self._fail(Failure(), request)
            return NOT_DONE_YET
        if isinstance(result, Deferred):
            result.addCallback(self._respond, request)
            result.addErrback(self._fail, request)  # the handler's errors, and _respond's own
            result.addErrback(lambda f: log.failure("answering {path}", f, path=request.path))
        elif result is not STREAMING:
            try:
                self._respond(result, request)
            except Exception:
                self._fail(Failure(), request)
        return NOT_DONE_YET

    def _open(self, request) -> bool:
        """The request's path is open: every route on it needs no token (/healthz).
        Any method there is answered without one, a wrong one with 405: the methods
        of a public path are no secret."""
        _, _, segments = _target(request)
        on_path = [route for route in self.routes if route.match(segments) is not None]
        return bool(on_path) and all(route.scope is None for route in on_path)

    def _route(self, request) -> tuple[Route, dict[str, str]]:
        method, path, segments = _target(request)
        allowed = []
        for route in self.routes:
            params = route.match(segments)
            if params is None:
                continue
            if route.method == method:
                return route, params
            allowed.append(route.method)
        if allowed:
            raise MethodNotAllowed(f"{method} is not allowed on {path or '/'}",
                                   {b"Allow": ", ".join(sorted(set(allowed))).encode()})
        raise NotFound(f"no such endpoint: {path or '/'}")

    def _respond(self, response, request) -> None:
        if response is STREAMING or _gone(request):
            return
        request.setResponseCode(response.status)
        for name, value in response.headers.items():
            request.setHeader(name, value)
        body = _encoded(response.body)
        if body:
            request.setHeader(b"Content-Type", response.content_type)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def _fail(self, failure: Failure, request) -> None:
        if failure.check(ApiError):
            error = failure.value
            if error.refusal is not None and not isinstance(error.__cause__, Refused):
                self._refused(error.refusal)
            response = Response(error.status, {"error": error.message}, error.headers)
        else:
            log.failure("{method} {path} failed", failure, method=request.method, path=request.path)
            response = _INTERNAL_ERROR
        try:
            self._respond(response, request)
        except Exception:  # never leave a client waiting on an answer that cannot be written
            log.failure("answering {path} with {status}", path=request.path, status=response.status)
            if _gone(request):
                return
            if request.startedWriting:  # too late for a status: end it so the client knows
                request.channel.loseConnection()
                return
            request.responseHeaders = Headers({b"Server": [b"agent"]})
            self._respond(_INTERNAL_ERROR, request)


_INTERNAL_ERROR = Response(500, {"error": "internal error; see the agent's log"})


def _target(request) -> tuple[str, str, list[str]]:
    """(method, path, path segments) of a request, each segment percent-decoded after the
    split, so that a %2F inside one (a fleet key with a slash) stays in that segment."""
    raw = request.path.decode("utf-8", "replace").rstrip("/")
    segments = [unquote(segment) for segment in raw.strip("/").split("/")]
    return (request.method.decode("ascii", "replace").upper(), unquote(raw), segments)


def _encoded(body) -> bytes:
    """A JSON body as UTF-8; text that cannot be encoded (a lone surrogate in an old record)
    is sent as JSON's \\u escape rather than failing the answer."""
    if body is None:
        return b""
    if isinstance(body, bytes):
        return body
    try:
        return json.dumps(body, ensure_ascii=False).encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return json.dumps(body).encode("ascii") + b"\n"


def _gone(request) -> bool:
    """The client left (or the response is complete): nothing may be written any more."""
    return client_gone(request) or getattr(request, "finished", False)
