"""The HTTP API as a client sees it: a real Site on a port, real processes, treq."""
from __future__ import annotations

import json
import socket
import sys

import pytest_twisted
import treq
from twisted.internet import reactor

from agent.doors.tcp.protocol import TaskLineFactory
from agent.core.lanes import Lane
from tests.procs import group_members
from tests.webapi import TOKEN, api, eventually, group_alive, make_api, sleep  # noqa: F401

PY = sys.executable


# -- starting, reading back

@pytest_twisted.ensureDeferred
async def test_post_tasks_answers_201_with_the_record_and_its_location(api):
    response = await api.request("POST", "/tasks", {"command": "sleep", "args": ["30"]})
    record = await response.json()
    assert response.code == 201
    assert response.headers.getRawHeaders("Location") == [f"/tasks/{record['id']}"]
    assert (record["command"], record["state"], record["source"]) == (["sleep", "30"], "running",
                                                                      "http")
    assert record["pid"] > 0 and record["exit_code"] is None and record["error"] is None
    api.pgids.append(record["pid"])


@pytest_twisted.ensureDeferred
async def test_a_created_task_is_visible_at_once_in_the_record_and_the_history(api):
    for _ in range(5):
        record = await api.start("true")
        shown = await api.json("GET", f"/tasks/{record['id']}")
        listed = await api.json("GET", "/tasks?limit=1")
        assert shown["id"] == record["id"]
        assert listed["tasks"][0]["id"] == record["id"]


@pytest_twisted.ensureDeferred
async def test_an_ended_task_has_times_exit_code_and_byte_counts(api):
    record = await api.start("sh", "-c", "printf hello; printf oops >&2; exit 3")
    ended = await api.wait_for_state(record["id"], "failed")
    assert (ended["exit_code"], ended["error"]) == (3, "")
    assert (ended["stdout_bytes"], ended["stderr_bytes"]) == (5, 4)
    assert ended["started_at"] <= ended["finished_at"] and ended["duration_ms"] >= 0
    assert ended["created_at"].endswith("Z")


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
async def test_run_answers_with_stdout_as_text_and_the_exit_code_in_a_header(api):
    response = await api.request("POST", "/run", {"command": PY, "args": [
        "-c", "import sys; print('hello world'); print('not this', file=sys.stderr)"]})
    assert response.code == 200
    assert await response.text() == "hello world\n"
    assert response.headers.getRawHeaders("X-Exit-Code") == ["0"]
    assert response.headers.getRawHeaders("Content-Type") == ["text/plain; charset=utf-8"]


@pytest_twisted.ensureDeferred
async def test_run_reports_failure_in_headers_and_is_recorded(api):
    response = await api.request("POST", "/run", {"command": "sh", "args": ["-c", "echo x; exit 7"]})
    assert await response.text() == "x\n"
    assert response.headers.getRawHeaders("X-Exit-Code") == ["7"]
    task_id = response.headers.getRawHeaders("X-Task-Id")[0]
    record = await api.json("GET", f"/tasks/{task_id}")
    assert (record["state"], record["exit_code"], record["source"]) == ("failed", 7, "http")


@pytest_twisted.ensureDeferred
async def test_run_of_a_missing_program_says_why_in_x_error(api):
    response = await api.request("POST", "/run", {"command": "no-such-program-here"})
    assert await response.text() == ""
    assert response.headers.getRawHeaders("X-Exit-Code") == ["-1"]
    assert "No such file" in response.headers.getRawHeaders("X-Error")[0]


@pytest_twisted.ensureDeferred
async def test_run_timeout_is_in_seconds_with_fractions(api):
    response = await api.request("POST", "/run", {"command": "sleep", "args": ["30"],
                                                  "timeout": 0.3})
    await response.text()
    assert response.headers.getRawHeaders("X-Exit-Code") == ["-1"]
    assert response.headers.getRawHeaders("X-Task-State") == ["timed_out"]
    assert response.headers.getRawHeaders("X-Error") == ["timeout exceeded"]


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


@pytest_twisted.ensureDeferred
async def test_cancelling_an_ended_task_is_a_conflict(api):
    record = await api.start("true")
    await api.wait_for_state(record["id"], "succeeded")
    body = await api.json("POST", f"/tasks/{record['id']}/cancel", expect=409)
    assert "already ended (succeeded)" in body["error"]


@pytest_twisted.ensureDeferred
async def test_unknown_ids_are_404_everywhere(api):
    missing = "f" * 32
    for method, path in [("GET", f"/tasks/{missing}"), ("GET", f"/tasks/{missing}/output"),
                         ("POST", f"/tasks/{missing}/cancel"), ("DELETE", f"/tasks/{missing}"),
                         ("GET", "/tasks/not-an-id")]:
        body = await api.json(method, path, expect=404)
        assert "no task" in body["error"]


# -- limits

@pytest_twisted.ensureDeferred
async def test_over_max_running_is_429_and_starts_nothing(make_api):
    api = make_api(max_running=1)
    await api.start("sleep", "30")
    refused = await api.request("POST", "/tasks", {"command": "touch", "args": ["/tmp/never"]})
    body = await refused.json()
    assert refused.code == 429 and "--max-running" in body["error"]
    assert refused.headers.getRawHeaders("Retry-After") == ["1"]
    assert len(api.engine.live) == 1
    assert len((await api.json("GET", "/tasks"))["tasks"]) == 1


@pytest_twisted.ensureDeferred
async def test_once_the_agent_is_stopping_new_tasks_are_503(api):
    api.engine.cancel_all("agent shutting down", grace=5)
    for path in ("/tasks", "/run"):
        refused = await api.request("POST", path, {"command": "touch", "args": ["/tmp/never"]})
        assert refused.code == 503 and "shutting down" in (await refused.json())["error"]
        assert refused.headers.getRawHeaders("Retry-After") == ["5"]
    assert api.engine.live == {}


@pytest_twisted.ensureDeferred
async def test_output_past_max_log_bytes_keeps_the_newest_and_reports_the_drop(make_api):
    api = make_api(max_log_bytes=4096)
    record = await api.start(PY, "-c", "import sys\nfor i in range(2000): print('%05d' % i)")
    ended = await api.wait_for_state(record["id"], "succeeded")
    assert ended["stdout_bytes"] == 12000
    assert 12000 - 4096 <= ended["stdout_dropped"] < 12000
    response = await api.request("GET", f"/tasks/{record['id']}/output")
    text = await response.text()
    assert text.endswith("01999\n") and len(text) == 12000 - ended["stdout_dropped"]
    assert response.headers.getRawHeaders("X-Stdout-Dropped") == [str(ended["stdout_dropped"])]


# -- bad input

@pytest_twisted.ensureDeferred
async def test_malformed_json_is_400(api):
    body = await api.json("POST", "/tasks", raw=b'{"command": ', expect=400)
    assert "not valid JSON" in body["error"]


@pytest_twisted.ensureDeferred
async def test_wrong_types_are_422_naming_the_field(api):
    cases = [({"command": ["ls"]}, '"command"'), ({"command": "ls", "args": "-l"}, '"args"'),
             ({"command": "ls", "args": [1]}, '"args"[0]'), ({"command": "ls", "timeout": "5"},
                                                             '"timeout"'),
             ({"command": "ls", "env": {"A": 1}}, '"env"["A"]'), ({"command": "ls", "cwd": 3},
                                                                  '"cwd"'),
             ({"args": ["x"]}, '"command"'), ({"command": "ls", "tiemout": 1}, '"tiemout"')]
    for payload, field in cases:
        body = await api.json("POST", "/tasks", payload, expect=422)
        assert field in body["error"], (payload, body)
    assert api.engine.live == {}


@pytest_twisted.ensureDeferred
async def test_a_body_over_one_mebibyte_is_413(api):
    payload = json.dumps({"command": "echo", "args": ["x" * (1 << 20)]}).encode()
    body = await api.json("POST", "/tasks", raw=payload, expect=413)
    assert "larger than" in body["error"]


@pytest_twisted.ensureDeferred
async def test_bad_query_parameters_are_400(api):
    for path in ["/tasks?state=sleeping", "/tasks?limit=0", "/tasks?limit=x", "/tasks?cursor=zz"]:
        await api.json("GET", path, expect=400)
    record = await api.start("true")
    for query in ["stream=stdin", "offset=-1", "follow=maybe"]:
        await api.json("GET", f"/tasks/{record['id']}/output?{query}", expect=400)


# -- auth

@pytest_twisted.ensureDeferred
async def test_no_token_is_401_with_a_bearer_challenge_and_starts_nothing(api):
    response = await api.request("POST", "/tasks", {"command": "touch", "args": ["/tmp/x"]},
                                 token=None)
    assert response.code == 401
    assert response.headers.getRawHeaders("WWW-Authenticate")[0].startswith("Bearer")
    await response.json()
    assert api.engine.live == {}


@pytest_twisted.ensureDeferred
async def test_healthz_needs_no_token_and_counts_running_tasks(api):
    await api.start("sleep", "30")
    health = await api.json("GET", "/healthz", token=None)
    assert (health["status"], health["running"], health["history"]["writable"]) == ("ok", 1, True)


# -- history

@pytest_twisted.ensureDeferred
async def test_history_pages_newest_first_and_filters_by_state(api):
    ids = [(await api.start("true"))["id"] for _ in range(5)]
    for task_id in ids:
        await api.wait_for_state(task_id, "succeeded")
    seen, cursor = [], None
    while True:
        page = await api.json("GET", "/tasks?limit=2" + (f"&cursor={cursor}" if cursor else ""))
        seen += [t["id"] for t in page["tasks"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    running = await api.start("sleep", "30")
    only = await api.json("GET", "/tasks?state=running")
    assert [t["id"] for t in only["tasks"]] == [running["id"]]


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
        assert result["exit_code"] == 0
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
async def test_numbers_too_large_for_the_history_are_a_400(api):
    task = await api.start("echo", "x")
    await api.wait_for_state(task["id"], "succeeded")
    huge = str(1 << 64)
    for path, headers in [(f"/tasks?cursor={huge}", {}),
                          (f"/tasks/{task['id']}/output?offset={huge}", {}),
                          (f"/tasks/{task['id']}/output?stdout_offset={huge}", {}),
                          (f"/tasks/{task['id']}/output",
                           {"Accept": "text/event-stream", "Last-Event-ID": f"stdout:{huge}"})]:
        response = await api.request("GET", path, headers=headers)
        assert response.code == 400, (path, await response.text())


@pytest_twisted.ensureDeferred
async def test_an_old_record_holding_a_lone_surrogate_is_listed_not_a_hang(api, tmp_path):
    """Before text was checked at parse time, such a record made every listing hang."""
    import sqlite3
    with sqlite3.connect(tmp_path / "data" / "history.sqlite3") as db:
        db.execute("INSERT INTO tasks (id, source, command, state, created_at, stdout_bytes, "
                   "stderr_bytes, stdout_dropped, stderr_dropped) VALUES "
                   "(?, 'tcp', '[\"echo\", \"\\ud800\"]', 'succeeded', 1, 0, 0, 0, 0)", ("b" * 32,))
    listed = await api.json("GET", "/tasks")
    assert listed["tasks"][0]["command"] == ["echo", "\ud800"]
    shown = await api.json("GET", f"/tasks/{'b' * 32}")
    assert shown["command"] == ["echo", "\ud800"]
