"""The HTTP API assembled: routes, the token check, and a Site that caps request bodies."""
from __future__ import annotations

import os
from typing import Mapping

from twisted.web.server import Site

from agent.engine import Engine, Lane
from agent.store import Store
from agent.web.auth import BearerAuth
from agent.web.body import MAX_BODY, CappedContent
from agent.web.openapi import document
from agent.web.output import OutputEndpoint
from agent.web.router import Response, Route, Router
from agent.web.tasks import TaskEndpoints


def routes(engine: Engine, store: Store, lane: Lane, kill_grace: float = 5.0, clock=None,
           environ: Mapping[str, str] = os.environ) -> list[Route]:
    tasks = TaskEndpoints(engine, store, lane, kill_grace, environ)
    output = OutputEndpoint(store, clock)
    spec = document()
    return [
        Route("GET", "/healthz", tasks.health, auth=False),
        Route("GET", "/openapi.json", lambda request: Response(200, spec)),
        Route("POST", "/run", tasks.run),
        Route("POST", "/tasks", tasks.create),
        Route("GET", "/tasks", tasks.list),
        Route("GET", "/tasks/{id}", tasks.show),
        Route("DELETE", "/tasks/{id}", tasks.cancel),
        Route("POST", "/tasks/{id}/cancel", tasks.cancel),
        Route("GET", "/tasks/{id}/output", output.get),
    ]


class ApiSite(Site):
    """A Site whose request bodies stop being kept past MAX_BODY (the API answers 413)."""

    displayTracebacks = False
    noisy = False

    def getContentFile(self, length):
        return CappedContent(MAX_BODY, length)


def make_site(engine: Engine, store: Store, lane: Lane, token: str, kill_grace: float = 5.0,
              clock=None) -> ApiSite:
    return ApiSite(Router(routes(engine, store, lane, kill_grace, clock), BearerAuth(token)))
