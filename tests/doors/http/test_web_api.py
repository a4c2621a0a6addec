"""The HTTP API over a real port with real processes: what a child or a socket does.

What the API answers is tested in memory (test_web_requests.py and the others that use
tests/doors/http/memory.py)."""
from __future__ import annotations

import json
import socket
import sys

import pytest_twisted
from twisted.internet import reactor

from agent.doors.tcp.protocol import TaskLineFactory
from agent.core.lanes import Lane
from tests.procs import group_members
from tests.webapi import TOKEN, api, eventually, group_alive, make_api  # noqa: F401

PY = sys.executable


# -- starting, reading back

@pytest_twisted.ensureDeferred
async def test_a_created_task_is_visible_at_once_in_the_record_and_the_history(api):
    for _ in range(5):
        record = await api.start("true")
        shown = await api.json("GET", f"/tasks/{record['id']}")
        listed = await api.json("GET", "/tasks?limit=1")
        assert shown["id"] == record["id"]
        assert listed["tasks"][0]["id"] == record["id"]


@pytest_twisted.ensureDeferred
async def test_env_adds_to_the_environment_and_cwd_is_where_it_runs(api, tmp_path):
    record = await api.start(PY, "-c", "import os; print(os.environ['GREETING'], os.getcwd(), "
                                       "'PATH' in os.environ)",
                             env={"GREETING": "hi"}, cwd=str(tmp_path))
    await api.wait_for_state(record["id"], "succeeded")
    out = await api.request("GET", f"/tasks/{record['id']}/output")
    assert await out.text() == f"hi {tmp_path} True\n"


@pytest_twisted.ensureDeferred
async def test_resource_limits_apply_as_on_tcp(api):
    record = await api.start(PY, "-c", "import resource; "
                                       "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])",
                             limits={"nofile": 77})
    await api.wait_for_state(record["id"], "succeeded")
    out = await api.request("GET", f"/tasks/{record['id']}/output")
    assert await out.text() == "77\n"


@pytest_twisted.ensureDeferred
async def test_a_command_that_cannot_start_fails_with_the_reason(api):
    record = await api.start("/nonexistent/program")
    ended = await api.wait_for_state(record["id"], "failed")
    assert ended["exit_code"] == -1 and "No such file" in ended["error"]
    assert ended["started_at"] is None


@pytest_twisted.ensureDeferred
async def test_command_is_an_argv_never_a_shell_line(api, tmp_path):
    marker = tmp_path / "pwned"
    record = await api.start("echo", f"; touch {marker}")
    await api.wait_for_state(record["id"], "succeeded")
    out = await api.request("GET", f"/tasks/{record['id']}/output")
    assert await out.text() == f"; touch {marker}\n"
    assert not marker.exists()


# -- /run

@pytest_twisted.ensureDeferred
async def test_run_of_a_missing_program_says_why_in_x_error(api):
    response = await api.request("POST", "/run", {"command": "no-such-program-here"})
    assert await response.text() == ""
    assert response.headers.getRawHeaders("X-Exit-Code") == ["-1"]
    assert "No such file" in response.headers.getRawHeaders("X-Error")[0]


@pytest_twisted.ensureDeferred
async def test_a_run_client_that_leaves_cancels_its_task(api):
    client = socket.create_connection(("127.0.0.1", api.port.getHost().port))
    body = json.dumps({"command": "sleep", "args": ["300"]}).encode()
    client.sendall(b"POST /run HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
                   + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    page = await eventually(lambda: api.json("GET", "/tasks"), lambda p: p["tasks"])
    api.pgids.append(page["tasks"][0]["pid"])
    client.close()
    ended = await api.wait_for_state(page["tasks"][0]["id"], "cancelled")
    assert ended["error"] == "client disconnected"


# -- timeouts and cancel

@pytest_twisted.ensureDeferred
async def test_a_task_past_its_timeout_is_timed_out(api):
    record = await api.start("sleep", "30", timeout=0.2)
    ended = await api.wait_for_state(record["id"], "timed_out")
    assert (ended["exit_code"], ended["error"]) == (-1, "timeout exceeded")
    assert not group_alive(record["pid"])


@pytest_twisted.ensureDeferred
async def test_cancel_kills_a_shell_and_its_grandchild(api):
    record = await api.start("sh", "-c", "sleep 300 & sleep 300 & wait")
    await eventually(lambda: _async(group_members(record["pid"])), lambda pids: len(pids) >= 3)
    cancelled = await api.json("POST", f"/tasks/{record['id']}/cancel")
    assert (cancelled["state"], cancelled["exit_code"], cancelled["error"]) == \
        ("cancelled", -1, "cancelled by request")
    assert (cancelled["reason"], cancelled["cleanup"]) == ("cancelled", "complete")
    await eventually(lambda: _async(group_alive(record["pid"])), lambda alive: not alive, 5)


@pytest_twisted.ensureDeferred
async def test_cancel_kills_a_task_that_ignores_sigterm_after_the_grace(make_api):
    api = make_api(kill_grace=0.3)
    record = await api.start(PY, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                       "signal.SIG_IGN); print('ready', flush=True); time.sleep(300)")
    await eventually(lambda: api.json("GET", f"/tasks/{record['id']}"),
                     lambda r: r["stdout_bytes"] > 0)
    cancelled = await api.json("DELETE", f"/tasks/{record['id']}")
    assert (cancelled["state"], cancelled["cleanup"]) == ("cancelled", "complete")
    assert not group_alive(record["pid"])


# -- the history of the other door

@pytest_twisted.ensureDeferred
async def test_tcp_tasks_appear_in_the_history_with_their_argv(api):
    newest = await _tcp_task(api, b'{"command": ["echo", "via", "tcp"]}\n')
    assert (newest["command"], newest["source"], newest["state"]) == \
        (["echo", "via", "tcp"], "tcp", "succeeded")
    assert (newest["stdout_bytes"], newest["stdout_dropped"]) == (8, 8), \
        "counted; without an id the output only went to the TCP client"
    out = await api.request("GET", f"/tasks/{newest['id']}/output")
    assert await out.text() == ""


@pytest_twisted.ensureDeferred
async def test_a_tcp_task_with_an_id_keeps_its_stdout_for_a_retry(api):
    newest = await _tcp_task(api, b'{"command": ["echo", "via", "tcp"], "id": "j1"}\n')
    assert (newest["request_id"], newest["stdout_bytes"], newest["stdout_dropped"]) == ("j1", 8, 0)
    out = await api.request("GET", f"/tasks/{newest['id']}/output")
    assert await out.text() == "via tcp\n"


@pytest_twisted.ensureDeferred
async def test_tcp_output_is_kept_when_asked_for(make_api):
    api = make_api(keep_tcp_output=True)
    newest = await _tcp_task(api, b'{"command": ["echo", "kept"]}\n')
    assert (newest["stdout_bytes"], newest["stdout_dropped"]) == (5, 0)
    out = await api.request("GET", f"/tasks/{newest['id']}/output")
    assert await out.text() == "kept\n"


async def _tcp_task(api, line: bytes) -> dict:
    """Run one task through a TCP door on the same engine; its record, read right after."""
    port = reactor.listenTCP(0, TaskLineFactory(api.engine, Lane(1), clock=reactor),
                             interface="127.0.0.1")
    try:
        result = json.loads(await _tcp_round_trip(port.getHost().port, line))
        assert result["exit_code"] == 0, result["error"]
        return (await api.json("GET", "/tasks?limit=1"))["tasks"][0]
    finally:
        await port.stopListening()


async def _tcp_round_trip(port: int, line: bytes) -> bytes:
    from twisted.internet.threads import deferToThread

    def blocking():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(line)
            return s.makefile("rb").readline()
    return await deferToThread(blocking)


async def _async(value):
    return value




@pytest_twisted.ensureDeferred
async def test_a_huge_argv_is_cut_in_the_record_and_its_retry_still_replays(api):
    half = "z" * 100_000  # one argument may hold at most 128 KiB (MAX_ARG_STRLEN)
    big = half + " " + half
    line = json.dumps({"command": ["echo", "-n", half, half], "id": "big-argv"}).encode() + b"\n"
    first = await _tcp_task(api, line)
    assert first["command_cut"] > 130_000 and first["command"][:2] == ["echo", "-n"]
    assert len(json.dumps(first["command"])) <= 64 << 10
    port = reactor.listenTCP(0, api.tcp_factory, interface="127.0.0.1")
    try:
        again = json.loads(await _tcp_round_trip(port.getHost().port, line))
    finally:
        await port.stopListening()
    assert again["replayed"] is True and again["output"] == big, "the whole output, not a conflict"


@pytest_twisted.ensureDeferred
async def test_the_history_filters_by_door_and_by_text_of_the_command(api):
    first = await api.start("echo", "needle-42")
    await api.start("echo", "haystack")
    tcp = await _tcp_task(api, b'{"command": ["echo", "needle-42 by tcp"]}\n')
    await api.wait_for_state(first["id"], "succeeded")
    found = await api.json("GET", "/tasks?q=needle-42")
    assert {t["id"] for t in found["tasks"]} == {first["id"], tcp["id"]}
    by_door = await api.json("GET", "/tasks?source=tcp&q=needle")
    assert [t["id"] for t in by_door["tasks"]] == [tcp["id"]]
    await api.json("GET", "/tasks?source=ftp", expect=400)
    await api.json("GET", "/tasks?q=" + "x" * 201, expect=400)
