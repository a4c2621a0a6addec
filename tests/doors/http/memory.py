"""The HTTP API in memory: its real site over a real Store, fake children, one Clock, StubTreq.

The site is agent.doors.http.api.make_site's, over a Store whose SQL runs inline
(tests/history/inline.py) and an engine whose children are fakes (tests.fakes.FakeHost),
all keeping time by one task.Clock. Requests go through treq's StubTreq: no socket, no
thread, no process, so a request is answered within the test's own call and the tests are
plain functions. tests/webapi.py (a real port, real processes) is for what is about
sockets or about processes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from agent.core.lanes import Lane
from agent.doors.http.api import make_site
from agent.doors.http.auth import TokenAuth
from agent.metrics import Metrics
from tests.fakes import FakeHost, exit_with
from tests.history.inline import inline_store
from tests.webapi import TOKEN

NOW = 1_700_000_000.0
"""Where the Clock starts: records get plausible times."""


@dataclass(frozen=True)
class Answer:
    code: int
    headers: Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> list[str] | None:
        return self.headers.getRawHeaders(name)


class MemoryApi:
    """The API as make_site builds it, over an inline store and fake children on one Clock."""

    def __init__(self, data_dir, max_running: int = 8, kill_grace: float = 5.0,
                 max_log_bytes: int = 1 << 20, fleet=None, auth: TokenAuth | None = None):
        """fleet(clock): the fleet Database the door gets (tests/doors/http/fleetdb.py), if
        any. auth: the tokens (default: TOKEN, with every scope)."""
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.fleet = None if fleet is None else fleet(self.clock)
        self.store = inline_store(data_dir, self.clock, max_log_bytes)
        self.metrics = Metrics(live=lambda: self.engine.live.values(), health=self.store.health,
                               process=False)
        host = FakeHost(self.store, self.clock, observers=[self.metrics.observe],
                        cleanup_observers=[self.metrics.observe_cleanup],
                        refusal_observers=[self.metrics.refused])
        self.engine, self.spawn, self.kills = host.engine, host.spawn, host.kills
        self.site = make_site(self.engine, self.store, Lane(max_running),
                              auth or TokenAuth({}).with_admin(TOKEN), kill_grace,
                              self.clock, environ={}, metrics=self.metrics, fleet=self.fleet)
        self._client = _stub_serving(self.site)

    # -- requests

    def send(self, method: str, path: str, body=None, token: str | None = TOKEN,
             headers: dict | None = None, raw: bytes | None = None) -> Deferred:
        """The Answer as a Deferred, for a request that waits for a child (cancel, /run)."""
        all_headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        all_headers.update(headers or {})
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        sent = self._client.request(method, "http://agent" + path, data=data, headers=all_headers)
        sent.addCallback(lambda response: self._client.content(response).addCallback(
            lambda content: Answer(response.code, response.headers, content)))
        return sent

    def request(self, method: str, path: str, body=None, **kwargs) -> Answer:
        """Sent and answered now (AssertionError if the API has not answered)."""
        return self.result(self.send(method, path, body, **kwargs))

    def json(self, method: str, path: str, body=None, expect: int = 200, **kwargs) -> Any:
        answer = self.request(method, path, body, **kwargs)
        content = answer.json()
        assert answer.code == expect, content
        return content

    def start(self, command: str, *args: str, **fields) -> dict:
        """POST /tasks: the new task's record (its fake child is running)."""
        return self.json("POST", "/tasks", {"command": command, "args": list(args), **fields},
                         expect=201)

    def result(self, sent: Deferred):
        """What sent fired with, once the client and the site have said all they have."""
        assert self.answered(sent), "no answer yet"
        results = []
        sent.addBoth(results.append)
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def answered(self, sent: Deferred) -> bool:
        """Whether sent has its result, once the client and the site have said all they have."""
        self._client.flush()
        fired = []
        sent.addBoth(lambda result: fired.append(True) or result)
        return bool(fired)

    # -- the fake children

    def child(self, task_id: str):
        """The running task's fake child (a TaskProcess): feed it output, make it exit."""
        return self.engine.live[task_id].runner

    def finish(self, task_id: str, code: int = 0, stdout: bytes = b"", stderr: bytes = b"",
               seconds: float = 0.0) -> dict:
        """The child writes, runs for `seconds`, and exits with `code`; the ended record."""
        child = self.child(task_id)
        if stdout:
            child.childDataReceived(1, stdout)
        if stderr:
            child.childDataReceived(2, stderr)
        self.clock.advance(seconds)
        exit_with(child, code)
        return self.json("GET", f"/tasks/{task_id}")

    def exit_all(self, code: int = 0) -> None:
        """Every running child exits."""
        for live in list(self.engine.live.values()):
            if live.runner is not None:
                exit_with(live.runner, code)

    def close(self) -> None:
        self.engine.cancel_all("test over")
        self.result(self.store.close())
        if self.fleet is not None:
            self.result(self.fleet.close())


def _stub_serving(site: Site) -> StubTreq:
    """treq's StubTreq answering through the agent's own Site (its channel refuses a body
    over MAX_BODY, its request never parses a form), not the plain Site that StubTreq
    builds around site.resource, which would let those tests pass against any server."""
    client = StubTreq(site.resource)
    assert isinstance(client._agent._serverFactory, Site), "treq's in-memory agent changed"
    client._agent._serverFactory = site
    return client


@pytest.fixture
def memory_api(tmp_path):
    api = MemoryApi(tmp_path / "data")
    yield api
    api.close()


@pytest.fixture
def make_memory_api(tmp_path):
    made = []

    def make(**options):
        api = MemoryApi(tmp_path / f"data{len(made)}", **options)
        made.append(api)
        return api

    yield make
    for api in made:
        api.close()
