"""A real HTTP API on 127.0.0.1 port 0 over a real engine and store, and a treq client for it."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool

from agent.options import Options
from agent.service import build
from tests.procs import processes_where

TOKEN = "test-token-0123456789abcdefghijklmnop"


class LiveApi:
    """The agent as agent.service.build wires it (real engine, store and processes), with its
    HTTP site listening on port 0; the services around it (ports, retention) are not started."""

    def __init__(self, data_dir: Path, max_running: int = 8, max_log_bytes: int = 1 << 20,
                 kill_grace: float = 5.0, keep_tcp_output: bool = False, args=()):
        data_dir.mkdir(parents=True, exist_ok=True)
        token_file = data_dir / "token"
        token_file.write_text(TOKEN)
        token_file.chmod(0o600)
        options = Options()
        options.parseOptions(["--data-dir", str(data_dir), "--http", "tcp:0",
                              "--max-running", str(max_running), "--max-log-bytes",
                              str(max_log_bytes), "--kill-grace", str(kill_grace),
                              *(["--keep-tcp-output"] if keep_tcp_output else []), *args])
        self.options = options  # kept: usage.Options holds cycles that the GC test would find
        agent = build(options, reactor)
        self.engine, self.store, self.site = agent.engine, agent.store, agent.site
        self.tcp_factory = agent.tcp_factory
        self.store.open()
        self.store.start()
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        self.http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        self.pgids: list[int] = []

    def request(self, method: str, path: str, body=None, token: str | None = TOKEN,
                headers: dict | None = None, raw: bytes | None = None, **kwargs):
        all_headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        all_headers.update(headers or {})
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        return self.http.request(method, self.url + path, data=data, headers=all_headers, **kwargs)

    async def json(self, method: str, path: str, body=None, expect: int = 200, **kwargs):
        response = await self.request(method, path, body, **kwargs)
        content = await response.json()
        assert response.code == expect, content
        return content

    async def start(self, command: str, *args: str, **fields) -> dict:
        record = await self.json("POST", "/tasks", {"command": command, "args": list(args),
                                                    **fields}, expect=201)
        if record["pid"]:
            self.pgids.append(record["pid"])
        return record

    async def wait_for_state(self, task_id: str, *states: str, timeout: float = 15.0) -> dict:
        return await eventually(lambda: self.json("GET", f"/tasks/{task_id}"),
                                lambda record: record["state"] in states, timeout)

    async def close(self):
        """Always stops the store's thread, or the test run could never exit."""
        self.engine.cancel_all("test over")
        try:
            await self.port.stopListening()
        finally:
            await self.store.close()
        for pgid in self.pgids:
            assert not wait_for_group_to_go(pgid), f"process group {pgid} outlived its task"


async def eventually(fetch, done, timeout: float = 15.0, interval: float = 0.02):
    """Poll fetch() until done(value); the last value, or AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still not there after {timeout}s: {value!r}")
        await deferLater(reactor, interval, lambda: None)


async def sleep(seconds: float):
    await deferLater(reactor, seconds, lambda: None)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return bool(processes_where(2, pgid))  # zombies awaiting a reap do not count


def wait_for_group_to_go(pgid: int, timeout: float = 5.0) -> bool:
    """True if the group is still alive after timeout (and then it is killed)."""
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() > deadline:
            os.killpg(pgid, signal.SIGKILL)
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def api(tmp_path):
    live = LiveApi(tmp_path / "data")
    yield live
    pytest_twisted.blockon(ensureDeferred(live.close()))


@pytest.fixture
def make_api(tmp_path):
    made = []

    def make(**options):
        live = LiveApi(tmp_path / f"data{len(made)}", **options)
        made.append(live)
        return live

    yield make
    for live in made:
        pytest_twisted.blockon(ensureDeferred(live.close()))
