"""The HTTP API's answers, in memory (tests/doors/http/memory.py): the real site over a real
store, fake children on a Clock, treq's StubTreq. What needs a socket or a real process is
in test_web_api.py."""
from __future__ import annotations

import json
import signal
import sqlite3

from agent.core.lanes import Lane
from agent.core.request import TaskRequest
from agent.doors.http.tasks import Discard
from tests.doors.http.memory import memory_api, make_memory_api  # noqa: F401
from tests.fakes import exit_with

GONE = "f" * 32


# -- starting, reading back

def test_post_tasks_answers_201_with_the_record_and_its_location(memory_api):
    answer = memory_api.request("POST", "/tasks", {"command": "sleep", "args": ["30"]})
    record = answer.json()
    assert answer.code == 201
    assert answer.header("Location") == [f"/tasks/{record['id']}"]
    assert (record["command"], record["state"], record["source"]) == (["sleep", "30"], "running",
                                                                      "http")
    argv, child = memory_api.spawn.spawned[-1]
    assert argv == ["sleep", "30"] and record["pid"] == child.pid
    assert record["exit_code"] is None and record["error"] is None


def test_an_ended_task_has_times_exit_code_and_byte_counts(memory_api):
    record = memory_api.start("work")
    ended = memory_api.finish(record["id"], 3, stdout=b"hello", stderr=b"oops", seconds=2.5)
    assert (ended["state"], ended["reason"], ended["exit_code"], ended["error"]) == \
        ("failed", "exited", 3, "")
    assert (ended["stdout_bytes"], ended["stderr_bytes"]) == (5, 4)
    assert (ended["started_at"], ended["finished_at"], ended["duration_ms"]) == \
        ("2023-11-14T22:13:20.000Z", "2023-11-14T22:13:22.500Z", 2500.0)
    assert ended["cleanup"] == "complete"


def test_show_answers_the_same_record_the_list_has(memory_api):
    record = memory_api.start("work")
    assert memory_api.json("GET", f"/tasks/{record['id']}") == record
    assert memory_api.json("GET", "/tasks")["tasks"] == [record]


# -- /run

def test_run_answers_with_stdout_as_text_once_the_task_ends(memory_api):
    sent = memory_api.send("POST", "/run", {"command": "greet"})
    child = memory_api.spawn.protocol()
    child.childDataReceived(1, b"hello world\n")
    child.childDataReceived(2, b"not this\n")
    assert not memory_api.answered(sent)
    exit_with(child, 0)
    answer = memory_api.result(sent)
    assert (answer.code, answer.body) == (200, b"hello world\n")
    assert answer.header("X-Exit-Code") == ["0"]
    assert answer.header("Content-Type") == ["text/plain; charset=utf-8"]


def test_run_reports_failure_in_headers_and_is_recorded(memory_api):
    sent = memory_api.send("POST", "/run", {"command": "sh", "args": ["-c", "exit 7"]})
    exit_with(memory_api.spawn.protocol(), 7)
    answer = memory_api.result(sent)
    assert answer.header("X-Exit-Code") == ["7"] and answer.header("X-Task-State") == ["failed"]
    record = memory_api.json("GET", f"/tasks/{answer.header('X-Task-Id')[0]}")
    assert (record["state"], record["exit_code"], record["source"]) == ("failed", 7, "http")


def test_run_timeout_is_in_seconds_with_fractions(memory_api):
    sent = memory_api.send("POST", "/run", {"command": "sleep", "args": ["30"], "timeout": 0.3})
    memory_api.clock.advance(0.29)
    assert not memory_api.answered(sent)
    memory_api.clock.advance(0.01)
    answer = memory_api.result(sent)
    assert answer.header("X-Exit-Code") == ["-1"]
    assert answer.header("X-Task-State") == ["timed_out"]
    assert answer.header("X-Error") == ["timeout exceeded"]


# -- cancel

def test_cancel_sigterms_the_group_and_answers_once_the_child_is_gone(memory_api):
    record = memory_api.start("sleep", "300")
    sent = memory_api.send("POST", f"/tasks/{record['id']}/cancel")
    assert memory_api.kills.calls == [(record["pid"], signal.SIGTERM)]
    assert not memory_api.answered(sent)
    exit_with(memory_api.child(record["id"]), signal=signal.SIGTERM)
    cancelled = memory_api.result(sent).json()
    assert (cancelled["state"], cancelled["exit_code"], cancelled["error"]) == \
        ("cancelled", -1, "cancelled by request")
    assert (cancelled["reason"], cancelled["cleanup"]) == ("cancelled", "complete")


def test_cancel_sigkills_a_child_still_there_after_the_grace(make_memory_api):
    api = make_memory_api(kill_grace=0.3)
    record = api.start("stubborn")
    sent = api.send("DELETE", f"/tasks/{record['id']}")
    api.clock.advance(0.29)
    assert not api.answered(sent) and (record["pid"], signal.SIGKILL) not in api.kills.calls
    api.clock.advance(0.01)
    assert (record["pid"], signal.SIGKILL) in api.kills.calls
    cancelled = api.result(sent).json()
    assert (cancelled["state"], cancelled["cleanup"]) == ("cancelled", "complete")


def test_cancelling_an_ended_task_is_a_conflict(memory_api):
    record = memory_api.start("true")
    memory_api.finish(record["id"])
    body = memory_api.json("POST", f"/tasks/{record['id']}/cancel", expect=409)
    assert "already ended (succeeded)" in body["error"]


def test_unknown_ids_are_404_everywhere(memory_api):
    for method, path in [("GET", f"/tasks/{GONE}"), ("GET", f"/tasks/{GONE}/output"),
                         ("POST", f"/tasks/{GONE}/cancel"), ("DELETE", f"/tasks/{GONE}"),
                         ("GET", "/tasks/not-an-id")]:
        body = memory_api.json(method, path, expect=404)
        assert "no task" in body["error"]


def test_unknown_paths_are_404_and_wrong_methods_405(memory_api):
    assert "no such endpoint" in memory_api.json("GET", "/nope", expect=404)["error"]
    answer = memory_api.request("PUT", "/tasks")
    assert answer.code == 405 and answer.header("Allow") == ["GET, POST"]


# -- limits

def test_over_max_running_is_429_and_starts_nothing(make_memory_api):
    api = make_memory_api(max_running=1)
    api.start("sleep", "30")
    refused = api.request("POST", "/tasks", {"command": "touch", "args": ["/tmp/never"]})
    assert refused.code == 429 and "--max-running" in refused.json()["error"]
    assert refused.header("Retry-After") == ["1"]
    assert len(api.spawn.spawned) == len(api.engine.live) == 1
    assert len(api.json("GET", "/tasks")["tasks"]) == 1


def test_once_the_agent_is_stopping_new_tasks_are_503(memory_api):
    memory_api.engine.cancel_all("agent shutting down", grace=5)
    for path in ("/tasks", "/run"):
        refused = memory_api.request("POST", path, {"command": "touch"})
        assert refused.code == 503 and "shutting down" in refused.json()["error"]
        assert refused.header("Retry-After") == ["5"]
    assert memory_api.spawn.spawned == []


def test_output_past_max_log_bytes_keeps_the_newest_and_reports_the_drop(make_memory_api):
    api = make_memory_api(max_log_bytes=4096)
    record = api.start("count")
    lines = b"".join(b"%05d\n" % i for i in range(2000))
    for at in range(0, len(lines), 600):
        api.child(record["id"]).childDataReceived(1, lines[at:at + 600])
    ended = api.finish(record["id"])
    assert ended["stdout_bytes"] == 12000
    assert 12000 - 4096 <= ended["stdout_dropped"] < 12000
    answer = api.request("GET", f"/tasks/{record['id']}/output")
    assert answer.body == lines[ended["stdout_dropped"]:]
    assert answer.header("X-Stdout-Dropped") == [str(ended["stdout_dropped"])]


# -- bad input

def test_malformed_json_is_400(memory_api):
    body = memory_api.json("POST", "/tasks", raw=b'{"command": ', expect=400)
    assert "not valid JSON" in body["error"]


def test_wrong_types_are_422_naming_the_field(memory_api):
    cases = [({"command": ["ls"]}, '"command"'), ({"command": "ls", "args": "-l"}, '"args"'),
             ({"command": "ls", "args": [1]}, '"args"[0]'),
             ({"command": "ls", "timeout": "5"}, '"timeout"'),
             ({"command": "ls", "env": {"A": 1}}, '"env"["A"]'),
             ({"command": "ls", "cwd": 3}, '"cwd"'),
             ({"args": ["x"]}, '"command"'), ({"command": "ls", "tiemout": 1}, '"tiemout"')]
    for payload, field in cases:
        body = memory_api.json("POST", "/tasks", payload, expect=422)
        assert field in body["error"], (payload, body)
    assert memory_api.spawn.spawned == []


def test_a_body_over_one_mebibyte_is_413(memory_api):
    payload = json.dumps({"command": "echo", "args": ["x" * (1 << 20)]}).encode()
    body = memory_api.json("POST", "/tasks", raw=payload, expect=413)
    assert "larger than 1048576 bytes" in body["error"]
    assert memory_api.spawn.spawned == []


def test_bad_query_parameters_are_400(memory_api):
    for path in ["/tasks?state=sleeping", "/tasks?limit=0", "/tasks?limit=x", "/tasks?cursor=zz"]:
        memory_api.json("GET", path, expect=400)
    record = memory_api.start("true")
    for query in ["stream=stdin", "offset=-1", "follow=maybe"]:
        memory_api.json("GET", f"/tasks/{record['id']}/output?{query}", expect=400)


def test_numbers_too_large_for_the_history_are_a_400(memory_api):
    task = memory_api.start("echo", "x")
    memory_api.finish(task["id"], stdout=b"x\n")
    huge = str(1 << 64)
    for path, headers in [(f"/tasks?cursor={huge}", {}),
                          (f"/tasks/{task['id']}/output?offset={huge}", {}),
                          (f"/tasks/{task['id']}/output?stdout_offset={huge}", {}),
                          (f"/tasks/{task['id']}/output",
                           {"Accept": "text/event-stream", "Last-Event-ID": f"stdout:{huge}"})]:
        answer = memory_api.request("GET", path, headers=headers)
        assert answer.code == 400, (path, answer.body)


def test_an_old_record_holding_a_lone_surrogate_is_listed_not_a_hang(memory_api, tmp_path):
    """Before text was checked at parse time, such a record made every listing hang."""
    with sqlite3.connect(tmp_path / "data" / "history.sqlite3") as db:
        db.execute("INSERT INTO tasks (id, source, command, state, created_at, stdout_bytes, "
                   "stderr_bytes, stdout_dropped, stderr_dropped) VALUES "
                   "(?, 'tcp', '[\"echo\", \"\\ud800\"]', 'succeeded', 1, 0, 0, 0, 0)",
                   ("b" * 32,))
    listed = memory_api.json("GET", "/tasks")
    assert listed["tasks"][0]["command"] == ["echo", "\ud800"]
    shown = memory_api.json("GET", f"/tasks/{'b' * 32}")
    assert shown["command"] == ["echo", "\ud800"]


# -- auth and health

def test_no_token_is_401_with_a_bearer_challenge_and_starts_nothing(memory_api):
    answer = memory_api.request("POST", "/tasks", {"command": "touch"}, token=None)
    assert answer.code == 401 and "error" in answer.json()
    assert answer.header("WWW-Authenticate")[0].startswith("Bearer")
    assert memory_api.spawn.spawned == []


def test_healthz_needs_no_token_and_counts_running_tasks(memory_api):
    memory_api.start("sleep", "30")
    health = memory_api.json("GET", "/healthz", token=None)
    assert (health["status"], health["running"], health["history"]["writable"]) == ("ok", 1, True)


# -- history

def test_history_pages_newest_first_and_filters_by_state(memory_api):
    ids = [memory_api.start("true")["id"] for _ in range(5)]
    for task_id in ids:
        memory_api.finish(task_id)
    seen, cursor = [], None
    while True:
        page = memory_api.json("GET", "/tasks?limit=2" + (f"&cursor={cursor}" if cursor else ""))
        assert len(page["tasks"]) <= 2
        seen += [t["id"] for t in page["tasks"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    running = memory_api.start("sleep", "30")
    only = memory_api.json("GET", "/tasks?state=running")
    assert [t["id"] for t in only["tasks"]] == [running["id"]]


def test_a_queued_task_is_listed_as_queued(memory_api):
    lane = Lane(1, queue=True)  # HTTP never queues: queue through the engine, as TCP does
    memory_api.engine.submit(TaskRequest(("sleep", "30")), lane, Discard(), source="tcp")
    queued = memory_api.engine.submit(TaskRequest(("sleep", "30")), lane, Discard(), source="tcp")
    listed = memory_api.json("GET", "/tasks?state=queued")["tasks"]
    assert [(t["id"], t["source"], t["pid"]) for t in listed] == [(queued.id, "tcp", None)]
