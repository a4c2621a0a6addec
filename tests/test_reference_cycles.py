"""Tasks and requests leave no reference cycles behind.

Memory held by a cycle is only freed when the cyclic GC gets round to it; under
thousands of tasks a second that inflates the agent's peak and fragments its
heap, so RSS never comes back. Each scenario runs twice (the first warms up
lazy imports), then the GC, told to keep what it finds, must find nothing of ours.
"""
from __future__ import annotations

import gc
import json
import socket
import types

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.web.server import Request

from agent.core.lanes import Lane
from agent.doors.tcp.protocol import TaskLineFactory
from tests.webapi import TOKEN, eventually, make_api, sleep  # noqa: F401

TCP_LINES = [
    {"command": ["true"]},
    {"command": ["sh", "-c", "echo out; echo err >&2; exit 3"]},
    {"command": ["/nonexistent/binary"]},
    {"command": ["sleep", "30"], "timeout": 0.05},
    {"command": ["head", "-c", "100000", "/dev/zero"]},  # over the door's output cap
    "{not json",
    {"command": 5},
]


def _suspect(thing) -> bool:
    """Objects whose cycles would be ours: agent code, a web request, a per-request class."""
    if isinstance(thing, type):
        return thing.__module__.startswith(("agent", "email"))
    if isinstance(thing, types.FunctionType):
        return thing.__module__.startswith("agent")
    return type(thing).__module__.startswith("agent") or isinstance(thing, Request)


def _cyclic_garbage() -> list:
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = [thing for thing in gc.garbage if _suspect(thing)]
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
        gc.collect()
    return found


def _blocking_tcp(port: int, lines: list, keyed: str) -> int:
    """Send every line (a keyed one twice), read every result, then leave a task running."""
    payload = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    payload += [json.dumps({"command": ["true"], "id": keyed})] * 2
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall("".join(line + "\n" for line in payload).encode())
        replies = s.makefile("rb")
        answered = sum(1 for _ in range(len(payload)) if replies.readline())
        s.sendall(b'{"command": ["sleep", "30"]}\n')  # killed when this client goes
    return answered


def _blocking_dropped_follow(port: int, task_id: str) -> bytes:
    """A follower that reads a little, then goes away mid-stream."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET /tasks/{task_id}/output?follow=true HTTP/1.1\r\nHost: x\r\n"
                  f"Accept: text/event-stream\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        return s.recv(4096)


async def _scenarios(api, tcp_port: int, round_name: str) -> None:
    assert await deferToThread(_blocking_tcp, tcp_port, TCP_LINES, f"{round_name}-k") == 9
    ran = await api.request("POST", "/run", {"command": "echo", "args": ["x"]})
    assert await ran.text() == "x\n"
    await api.json("POST", "/tasks", {"command": 5}, expect=422,
                   headers={"Content-Type": "application/x-www-form-urlencoded"})  # as curl -d
    keyed = {"Idempotency-Key": f"{round_name}-h"}
    first = await api.json("POST", "/tasks", {"command": "true"}, expect=201,
                           headers={**keyed, "Content-Type": "application/json"})
    await api.json("POST", "/tasks", {"command": "true"}, headers=keyed)
    await api.wait_for_state(first["id"], "succeeded")
    chatty = await api.start("sh", "-c", "while :; do echo x; sleep 0.05; done")
    assert b"200 OK" in await deferToThread(_blocking_dropped_follow, api.port.getHost().port,
                                            chatty["id"])
    await api.json("POST", f"/tasks/{chatty['id']}/cancel")
    await api.json("DELETE", f"/tasks/{chatty['id']}?purge=true")
    await eventually(_async_none, lambda _: not api.engine.live)
    await sleep(0.3)  # cleanup verification and history writes settle


async def _async_none():
    return None


@pytest.fixture
def gc_paused():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


@pytest_twisted.ensureDeferred
async def test_tasks_and_requests_leave_no_reference_cycles(make_api, gc_paused):
    api = make_api(kill_grace=0.2)
    factory = TaskLineFactory(api.engine, Lane(0), clock=reactor, max_output=1000)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        await _scenarios(api, port.getHost().port, "warm")
        _cyclic_garbage()
        await _scenarios(api, port.getHost().port, "measured")
        left = _cyclic_garbage()
        assert left == [], sorted({type(thing).__qualname__ for thing in left})
    finally:
        await port.stopListening()
