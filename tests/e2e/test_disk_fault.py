"""A real agent whose disk stops taking writes while tasks run, then heals.

The fault is a real one and needs no privilege: the test lowers the running
agent's RLIMIT_FSIZE (prlimit), so every write that would grow a file fails
with EFBIG, as on a full disk (Python ignores SIGXFSZ, so the agent is not
killed); raising it again is the disk being freed.
"""
from __future__ import annotations

import json
import resource
import sqlite3
import time

import pytest

from tests.e2e.test_http_agent import data_dir, start_http_agent  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs prlimit (Linux)")


def _health(api) -> dict:
    response, data = api.request("GET", "/healthz")
    assert response.status == 200
    return json.loads(data)


def _eventually(fetch, done, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"still {value!r}"
        time.sleep(0.05)


def test_a_full_disk_stops_no_tcp_task_and_loses_no_acknowledged_record(start_http_agent,
                                                                         data_dir):  # noqa: F811
    agent, api = start_http_agent("--parallel", "0")
    before = api.json("POST", "/tasks", {"command": "echo", "args": ["before"]}, expect=201)
    api.wait_for(before["id"], "succeeded")
    soft, hard = resource.prlimit(agent.proc.pid, resource.RLIMIT_FSIZE)
    client = agent.connect()

    resource.prlimit(agent.proc.pid, resource.RLIMIT_FSIZE, (1, hard))  # the disk is full
    try:
        results = []
        for i in range(20):
            client.send({"command": ["echo", f"tcp {i}"], "id": f"during-{i}"})
            results.append(client.receive())
        assert [r["output"] for r in results] == [f"tcp {i}\n" for i in range(20)]
        health = _eventually(lambda: _health(api), lambda h: h["status"] == "degraded")
        assert health["history"]["writable"] is False and health["history"]["error"]
        assert health["history"]["waiting"] >= 20
        response, data = api.request("POST", "/tasks", {"command": "echo", "args": ["refused"]})
        assert response.status == 503, data
        assert b"history cannot be written" in data
        agent.wait_for_log("cannot write the task history")
    finally:
        resource.prlimit(agent.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))  # freed

    _eventually(lambda: _health(api), lambda h: h["status"] == "ok")
    agent.wait_for_log("the task history is writable again")
    after = api.json("POST", "/tasks", {"command": "echo", "args": ["after"]}, expect=201)
    api.wait_for(after["id"], "succeeded")
    assert agent.stop() == 0

    with sqlite3.connect(data_dir / "history.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = dict(db.execute("SELECT request_id, state FROM tasks WHERE source = 'tcp'"))
        http = {row[0] for row in db.execute("SELECT id FROM tasks WHERE source = 'http'")}
    assert rows == {f"during-{i}": "succeeded" for i in range(20)}
    assert http == {before["id"], after["id"]}  # the refused one was never started
