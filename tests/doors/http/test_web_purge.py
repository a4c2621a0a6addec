"""DELETE /tasks/{id}?purge=true: an ended task's record and output removed; plain DELETE stays a cancel.

In memory (tests/doors/http/memory.py), but for a reader whose socket is still open."""
from __future__ import annotations

import os
import socket

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, globalLogPublisher

from agent.core.lanes import Lane
from agent.core.request import TaskRequest
from agent.doors.http.tasks import Discard
from tests.doors.http.memory import make_memory_api, memory_api  # noqa: F401
from tests.webapi import TOKEN, make_api  # noqa: F401

@pytest.fixture
def errors_logged():
    errors = []

    def observe(event):
        if event["log_level"] >= LogLevel.error:
            errors.append(event)
    globalLogPublisher.addObserver(observe)
    yield errors
    globalLogPublisher.removeObserver(observe)


def ended_task(api) -> dict:
    record = api.start("sh", "-c", "echo out; echo err >&2")
    return api.finish(record["id"], stdout=b"out\n", stderr=b"err\n")


def test_purge_answers_200_with_the_record_and_then_the_task_is_404_everywhere(memory_api):
    task = ended_task(memory_api)
    output_dir = memory_api.store.output_dir(task["id"])
    assert os.path.isdir(output_dir)
    assert memory_api.json("DELETE", f"/tasks/{task['id']}?purge=true") == task
    for path in [f"/tasks/{task['id']}", f"/tasks/{task['id']}/output",
                 f"/tasks/{task['id']}/output?stream=stderr"]:
        body = memory_api.json("GET", path, expect=404)
        assert "no task" in body["error"]
    assert memory_api.json("GET", "/tasks")["tasks"] == []
    assert not os.path.exists(output_dir)
    memory_api.json("DELETE", f"/tasks/{task['id']}?purge=true", expect=404)


def test_purge_of_a_running_task_is_409_and_it_keeps_running(make_memory_api):
    api = make_memory_api(kill_grace=0)
    running = api.start("sleep", "30")
    body = api.json("DELETE", f"/tasks/{running['id']}?purge=true", expect=409)
    assert "cancel it first" in body["error"]
    assert api.json("GET", f"/tasks/{running['id']}")["state"] == "running"
    assert api.engine.live[running["id"]].state == "running" and api.kills.calls == []
    cancelled = api.json("DELETE", f"/tasks/{running['id']}?purge=false")
    assert cancelled["state"] == "cancelled", "purge=false is the plain cancel"
    api.json("DELETE", f"/tasks/{running['id']}?purge=true")
    api.json("GET", f"/tasks/{running['id']}", expect=404)


def test_purge_of_a_queued_task_is_409(memory_api):
    lane = Lane(1, queue=True)  # HTTP never queues: queue through the engine itself, as TCP does
    memory_api.engine.submit(TaskRequest(("sleep", "30")), lane, Discard(), source="tcp")
    queued = memory_api.engine.submit(TaskRequest(("sleep", "30")), lane, Discard(), source="tcp")
    assert queued.state == "queued"
    memory_api.json("DELETE", f"/tasks/{queued.id}?purge=true", expect=409)
    assert memory_api.json("GET", f"/tasks/{queued.id}")["state"] == "queued"


def test_purge_of_an_unknown_task_is_404(memory_api):
    for task_id in ["f" * 32, "not-an-id"]:
        body = memory_api.json("DELETE", f"/tasks/{task_id}?purge=true", expect=404)
        assert "no task" in body["error"]


def test_purge_is_true_or_false_and_anything_else_is_400_that_does_nothing(memory_api):
    task = ended_task(memory_api)
    running = memory_api.start("sleep", "30")
    for value in ["yes", "1", "", "TRUE"]:
        for target in (task, running):
            body = memory_api.json("DELETE", f"/tasks/{target['id']}?purge={value}", expect=400)
            assert "purge must be one of true, false" in body["error"]
    assert memory_api.json("GET", f"/tasks/{task['id']}")["state"] == "succeeded"
    assert memory_api.json("GET", f"/tasks/{running['id']}")["state"] == "running"
    assert running["pid"] not in dict(memory_api.kills.calls), "not even signalled"


def test_purge_needs_the_token(memory_api):
    task = ended_task(memory_api)
    refused = memory_api.request("DELETE", f"/tasks/{task['id']}?purge=true", token=TOKEN + "x")
    assert refused.code == 401
    assert memory_api.json("GET", f"/tasks/{task['id']}")["state"] == "succeeded"


@pytest_twisted.ensureDeferred
async def test_a_reader_of_a_purged_task_gets_a_clean_end(make_api, errors_logged):
    api = make_api(max_log_bytes=64 << 20)
    size = 32 << 20
    record = await api.start("head", "-c", str(size), "/dev/zero")
    task = await api.wait_for_state(record["id"], "succeeded")
    port = api.port.getHost().port
    client = await deferToThread(_start_reading, port, f"/tasks/{task['id']}/output")
    await api.json("DELETE", f"/tasks/{task['id']}?purge=true")
    received = await deferToThread(_read_to_the_end, client)
    assert received.endswith(b"\r\n0\r\n\r\n"), "the chunked response was ended properly"
    assert len(received) < size, "the rest of the output was gone: the stream ended early"
    assert (await api.json("GET", "/healthz", token=None))["status"] == "ok"
    assert errors_logged == []


def _start_reading(port: int, path: str) -> socket.socket:
    """Send the request and read a little, so the agent's copy pauses on a full socket."""
    client = socket.create_connection(("127.0.0.1", port), timeout=20)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                   "Connection: close\r\n\r\n".encode())
    assert client.recv(65536).startswith(b"HTTP/1.1 200")
    return client


def _read_to_the_end(client: socket.socket) -> bytes:
    chunks = []
    with client:
        while data := client.recv(1 << 20):
            chunks.append(data)
    return b"".join(chunks)


def test_a_purged_tasks_idempotency_key_starts_a_new_task(memory_api):
    """Purge calls Store._forgotten: the key no longer names a task, so it is no replay."""
    key = {"Idempotency-Key": "nightly-42"}
    first = memory_api.json("POST", "/tasks", {"command": "true"}, expect=201, headers=key)
    memory_api.finish(first["id"])
    replay = memory_api.json("POST", "/tasks", {"command": "true"}, expect=200, headers=key)
    assert replay["id"] == first["id"]
    memory_api.json("DELETE", f"/tasks/{first['id']}?purge=true")
    again = memory_api.json("POST", "/tasks", {"command": "true"}, expect=201, headers=key)
    assert again["id"] != first["id"]
