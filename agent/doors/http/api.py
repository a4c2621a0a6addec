"""The HTTP API assembled: routes, the token check, and a Site that caps request bodies."""
from __future__ import annotations

import os
from functools import partial
from typing import Mapping

from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from twisted.internet.interfaces import IReactorTime

from agent.core.engine import Engine
from agent.core.lanes import Lane
from agent.history.store import Store
from agent.metrics import CONTENT_TYPE as METRICS_TYPE, Metrics
from agent.doors.http.auth import TokenAuth
from agent.doors.http.body import MAX_BODY, CappedContent
from agent.doors.http.dashboard import Dashboard
from agent.doors.http.fleet import FleetEndpoints
from agent.doors.http.openapi import document
from agent.doors.http.output import OutputEndpoint
from agent.doors.http.router import Response, Route, Router
from agent.doors.http.tasks import TaskEndpoints
from agent.fleet.database import Database


def routes(engine: Engine, store: Store, lane: Lane, kill_grace: float, clock: IReactorTime,
           environ: Mapping[str, str] = os.environ, *, metrics: Metrics,
           fleet: Database | None = None) -> list[Route]:
    """fleet: the door's own connection to the fleet database (--fleet), else None: the
    fleet's paths then answer 404."""
    tasks = TaskEndpoints(engine, store, lane, kill_grace, environ)
    fleet_endpoints = FleetEndpoints(fleet)
    output = OutputEndpoint(store, clock)
    spec = document()
    dashboard = Dashboard()
    return [
        Route("GET", "/healthz", tasks.health, scope=None),
        Route("GET", "/", dashboard.index, scope=None),  # the page and its files: no token
        Route("GET", "/static/{name}", dashboard.static, scope=None),
        Route("GET", "/openapi.json", lambda request: Response(200, spec)),
        Route("POST", "/run", tasks.run, scope="run"),
        Route("POST", "/tasks", tasks.create, scope="run"),
        Route("GET", "/tasks", tasks.list),
        Route("GET", "/tasks/{id}", tasks.show),
        Route("DELETE", "/tasks/{id}", tasks.delete, scope="cancel"),  # ?purge=true: purge
        Route("POST", "/tasks/{id}/cancel", tasks.cancel, scope="cancel"),
        Route("GET", "/tasks/{id}/output", output.get),
        Route("GET", "/metrics", lambda request: Response(200, metrics.exposition(),
                                                          content_type=METRICS_TYPE)),
        Route("GET", "/fleet/nodes", fleet_endpoints.nodes),
        Route("GET", "/fleet/tasks", fleet_endpoints.list),
        Route("POST", "/fleet/tasks", fleet_endpoints.submit, scope="run"),
        Route("GET", "/fleet/tasks/{key}", fleet_endpoints.show),
        Route("POST", "/fleet/tasks/{key}/cancel", fleet_endpoints.cancel, scope="cancel"),
    ]


HEADER_DEADLINE = 10.0
"""Seconds a client gets to send a request's line and headers; an idle timeout
alone never drops a client that dribbles one byte at a time."""

IDLE_TIMEOUT = 60.0
"""Seconds a connection may sit idle between requests (Twisted's default is 12 hours).
Twisted pauses it while a response, such as a follow stream, is being written."""

_TOO_LARGE = (b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: application/json\r\n"
              b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")


class ApiChannel(HTTPChannel):
    """HTTPChannel that refuses hostile clients early: a body announced larger
    than MAX_BODY is answered 413 before a byte of it is read, a chunked body
    as soon as it passes MAX_BODY, and headers must be complete within
    HEADER_DEADLINE."""

    _header_timer = None
    _refused = False

    def connectionMade(self):
        super().connectionMade()
        self._arm_header_deadline()

    def allHeadersReceived(self):
        self._disarm_header_deadline()
        if self.length is not None and self.length > MAX_BODY:
            self.refuse_too_large()
            return
        super().allHeadersReceived()

    def refuse_too_large(self):
        """Answer 413 and close without reading (or acting on) the rest of the body."""
        if self._refused:
            return
        self._refused = True
        body = b'{"error": "request body is larger than %d bytes"}' % MAX_BODY
        self.transport.write(_TOO_LARGE % (len(body), body))
        self.transport.loseConnection()
        self.dataReceived = self.lineReceived = lambda *args: None

    def allContentReceived(self):
        if not self._refused:  # the rest of a refused body may still be in hand
            super().allContentReceived()

    def requestDone(self, request):
        super().requestDone(request)
        if not self.transport.disconnecting:
            self._arm_header_deadline()  # the next request on this connection

    def connectionLost(self, reason):
        self._disarm_header_deadline()
        super().connectionLost(reason)

    def _arm_header_deadline(self):
        self._disarm_header_deadline()
        self._header_timer = self.callLater(HEADER_DEADLINE, self._headers_too_slow)

    def _disarm_header_deadline(self):
        if self._header_timer is not None and self._header_timer.active():
            self._header_timer.cancel()
        self._header_timer = None

    def _headers_too_slow(self):
        self._header_timer = None
        self.transport.abortConnection()


class ApiRequest(Request):
    """A request that has its channel refuse a body once it grows past MAX_BODY,
    and whose JSON body is never parsed as an HTML form (Twisted's form parsing
    builds a new email header class, a reference cycle, on every POST)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(*args, **kwargs)

    def handleContentChunk(self, data):
        super().handleContentChunk(data)
        if getattr(self.content, "too_large", False) and isinstance(self.channel, ApiChannel):
            self.channel.refuse_too_large()


class ApiSite(Site):
    """A Site whose request bodies stop being kept past MAX_BODY (the API answers 413)."""

    displayTracebacks = False
    noisy = False
    protocol = ApiChannel
    requestFactory = ApiRequest

    def __init__(self, resource, *args, **kwargs):
        kwargs.setdefault("timeout", IDLE_TIMEOUT)
        super().__init__(resource, *args, **kwargs)

    def getContentFile(self, length):
        return CappedContent(MAX_BODY, length)

    def log(self, request):
        """Every request is logged (who launched or cancelled what) except a
        /healthz that was fine: a monitor polling it every few seconds would
        bury the rest."""
        if request.path == b"/healthz" and request.code == 200:
            return
        super().log(request)


def make_site(engine: Engine, store: Store, lane: Lane, auth: TokenAuth, kill_grace: float,
              clock: IReactorTime, environ: Mapping[str, str] = os.environ, *,
              metrics: Metrics, fleet: Database | None = None) -> ApiSite:
    """clock also drives the site's own timers (header deadline, idle timeout).
    metrics: the agent's, served on GET /metrics; the site's own refusals go to the engine.
    fleet: the door's connection to the fleet database, if the agent is in one."""
    api = routes(engine, store, lane, kill_grace, clock, environ, metrics=metrics, fleet=fleet)
    return ApiSite(Router(api, auth, refused=partial(engine.refused, "http")), reactor=clock)
