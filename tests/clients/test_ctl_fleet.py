"""agentctl's fleet commands (`nodes`, `fleet list|show|submit|cancel`): their command line,
the body they send, the paths they ask, the pages they read, what they print (no network;
tests/e2e/test_fleet_http.py runs them against a real agent)."""
from __future__ import annotations

import io
import json

import pytest

from agent.clients.agentapi import encoded
from agent.clients.ctl import COMMANDS, Console
from agent.clients.ctlargs import parse_args
from agent.clients.ctlfleet import (list_fleet_tasks, node_rows, submission, task_lines,
                                    task_rows)

TASK = {"key": "build/7", "state": "finished", "command": ["make", "test"], "timeout": None,
        "limits": {}, "labels": {"os": "linux"}, "attempt": 2, "max_attempts": 3,
        "node_id": "node-b", "local_task_id": "ab" * 16, "submitted_by": "token:ci",
        "submitted_at": "2026-12-01T10:00:00.000Z", "started_at": "2026-12-01T10:00:05.000Z",
        "ended_at": "2026-12-01T10:00:07.500Z", "cancel_requested_at": None,
        "ending": "exited", "exit_code": 0, "error": "", "duration_ms": 2500.0,
        "stdout_bytes": 70000, "stderr_bytes": 6, "stdout_tail": "...end\n\x1b[31mred\n",
        "stderr_tail": "oops!\n",
        "output": {"node_id": "node-b", "local_task_id": "ab" * 16,
                   "url": "http://node-b:8080/tasks/" + "ab" * 16 + "/output"},
        "attempts": [
            {"attempt": 1, "node_id": "node-a", "started_at": "2026-12-01T10:00:01.000Z",
             "ended_at": "2026-12-01T10:00:04.000Z", "ending": "abandoned", "exit_code": None,
             "why": "node node-a stopped renewing its lease"},
            {"attempt": 2, "node_id": "node-b", "started_at": "2026-12-01T10:00:05.000Z",
             "ended_at": "2026-12-01T10:00:07.500Z", "ending": "exited", "exit_code": 0,
             "why": None}]}


# -- the command line and the body

def test_submit_sends_the_argv_and_only_what_was_given():
    args = parse_args(["fleet", "submit", "--", "sh", "-c", "echo --timeout"])
    assert submission(args) == {"command": ["sh", "-c", "echo --timeout"]}
    args = parse_args(["fleet", "submit", "--id", "k", "--timeout", "2.5", "--label", "os=linux",
                       "--label", "gpu=a100", "--max-attempts", "1", "--", "true"])
    assert submission(args) == {"command": ["true"], "id": "k", "timeout": 2.5,
                                "labels": {"os": "linux", "gpu": "a100"}, "max_attempts": 1}


def test_a_submit_without_a_command_says_how_to_give_one(capsys):
    with pytest.raises(SystemExit):
        parse_args(["fleet", "submit", "--id", "k"])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "agentctl fleet submit: error: give the command after --, as in "
        "agentctl fleet submit -- echo hello")


def test_options_may_come_anywhere_and_every_fleet_command_takes_json():
    args = parse_args(["fleet", "show", "k", "--url", "http://a:1", "--json"])
    assert (args.command, args.fleet_command, args.task_key, args.url, args.json) == \
        ("fleet", "show", "k", "http://a:1", True)
    for argv in (["nodes"], ["fleet", "list"], ["fleet", "cancel", "k"],
                 ["fleet", "submit", "--", "true"]):
        assert parse_args([*argv[:2], "--json", *argv[2:]]).json is True


def test_a_key_is_never_taken_for_the_tls_key_option():
    args = parse_args(["fleet", "cancel", "k", "--key", "client.pem"])
    assert (args.task_key, args.key) == ("k", "client.pem")
    assert not hasattr(parse_args(["fleet", "show", "k"]), "key")


@pytest.mark.parametrize("segments, path", [
    (("fleet", "tasks", "a/b c"), "/fleet/tasks/a%2Fb%20c"),
    (("fleet", "tasks", "ü?#%"), "/fleet/tasks/%C3%BC%3F%23%25"),
    (("fleet", "tasks", "..", "cancel"), "/fleet/tasks/%2E%2E/cancel"),
])
def test_a_key_goes_in_the_path_as_one_segment(segments, path):
    assert encoded(segments) == path
    assert encoded("/tasks/abc") == "/tasks/abc"


# -- calls, as the agent would answer them

class FakeApi:
    def __init__(self, *answers):
        self.answers, self.calls = list(answers), []

    def call(self, method, path, query=None, body=None, **kwargs):
        self.calls.append((method, path, query, body))
        return self.answers.pop(0)


def run(argv, *answers):
    api, out, err = FakeApi(*answers), io.BytesIO(), io.BytesIO()
    args = parse_args(argv)
    status = COMMANDS[args.command](api, args, Console(out, err))
    return status, api.calls, out.getvalue().decode()


def test_show_and_cancel_ask_for_the_key_as_one_segment():
    _, calls, _ = run(["fleet", "show", "build/7"], TASK)
    assert calls == [("GET", ("fleet", "tasks", "build/7"), None, None)]
    _, calls, said = run(["fleet", "cancel", "build/7"], {**TASK, "state": "running"})
    assert calls == [("POST", ("fleet", "tasks", "build/7", "cancel"), None, None)]
    assert said == "build/7 cancelling (node node-b was told)\n"
    assert run(["fleet", "cancel", "k"], {"key": "k", "state": "cancelled"})[2] == \
        "k cancelled\n"


def test_submit_prints_the_key_or_the_json():
    status, calls, said = run(["fleet", "submit", "--", "true"], {"key": "fleet-1"})
    assert (status, said) == (0, "fleet-1\n")
    assert calls == [("POST", "/fleet/tasks", None, {"command": ["true"]})]
    assert json.loads(run(["fleet", "submit", "--json", "--", "true"], TASK)[2]) == TASK


def test_list_reads_pages_until_the_limit_with_its_filters():
    api = FakeApi({"tasks": [{"key": str(i)} for i in range(1000)], "next": "9"},
                  {"tasks": [{"key": "x"}] * 300, "next": "5"})
    found = list_fleet_tasks(api, "finished", "node-a", 1200)
    assert len(found) == 1200
    assert [q for _, _, q, _ in api.calls] == [
        {"limit": 1000, "state": "finished", "node": "node-a"},
        {"limit": 200, "state": "finished", "node": "node-a", "cursor": "9"}]


def test_list_stops_at_the_last_page():
    api = FakeApi({"tasks": [{"key": "a"}], "next": None})
    assert list_fleet_tasks(api, None, None, 50) == [{"key": "a"}] and len(api.calls) == 1


# -- what is printed

def test_a_fleet_task_row_and_a_node_row():
    assert task_rows([TASK]) == [("build/7", "finished", "0", "node-b", "2/3",
                                  "2026-12-01T10:00:00Z", "2.5s", "make test")]
    node = {"id": "node-b", "state": "up", "running": 1, "parallel": 0, "heartbeat_age": 0.84,
            "labels": {"os": "linux", "gpu": "a100"}, "http": None}
    assert node_rows([node]) == [("node-b", "up", "1/unlimited", "0.8s ago",
                                  "gpu=a100,os=linux", "-")]


def test_show_prints_the_record_where_the_output_is_each_attempt_and_the_tails():
    lines = task_lines(TASK).splitlines()
    assert "key:" in lines[0] and "build/7" in lines[0]
    assert not any(line.startswith(("stdout_tail", "attempts", "output:  ")) for line in lines)
    assert lines[5].split() == ["labels:", "os=linux"] and lines[4].split() == ["limits:", "-"]
    assert (f"output: node node-b, task {'ab' * 16}, http://node-b:8080/tasks/{'ab' * 16}"
            "/output") in lines
    assert ("attempt 1: node node-a, abandoned, exit -, 2026-12-01T10:00:01Z to "
            "2026-12-01T10:00:04Z (node node-a stopped renewing its lease)") in lines
    tail = lines[lines.index("--- stdout, 70000 bytes; its end: ---"):]
    assert tail == ["--- stdout, 70000 bytes; its end: ---", "...end", "\\x1b[31mred",
                    "--- stderr, 6 bytes: ---", "oops!"]
