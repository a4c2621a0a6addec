"""The HTTP API of a real `twistd -n agent`: tokens, one history for both doors, restarts, kill -9."""
from __future__ import annotations

import http.client
import json
import stat
import subprocess
import time

import pytest

from tests.e2e.conftest import REPO, TWISTD
from tests.procs import group_members, wait_until_empty

DOORS = ("TCP task protocol", "HTTP API")


class Api:
    """A blocking client for one agent's HTTP door, as curl would be."""

    def __init__(self, agent, token: str):
        self.port = agent.ports["HTTP API"]
        self.token = token

    def request(self, method: str, path: str, body=None, token: str | None = None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Authorization": f"Bearer {token or self.token}"}
        connection.request(method, path, None if body is None else json.dumps(body), headers)
        response = connection.getresponse()
        data = response.read()
        connection.close()
        return response, data

    def json(self, method: str, path: str, body=None, expect: int = 200):
        response, data = self.request(method, path, body)
        assert response.status == expect, data
        return json.loads(data)

    def wait_for(self, task_id: str, *states: str, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            record = self.json("GET", f"/tasks/{task_id}")
            if record["state"] in states or time.monotonic() > deadline:
                assert record["state"] in states, record
                return record
            time.sleep(0.02)


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


@pytest.fixture
def start_http_agent(start_agent, data_dir):
    def start(*args):
        agent = start_agent("--http", "tcp:0:interface=127.0.0.1", "--data-dir", str(data_dir),
                            *args, doors=DOORS)
        return agent, Api(agent, (data_dir / "token").read_text().strip())
    return start


def test_first_start_creates_a_private_token_and_logs_where_not_what(start_http_agent, data_dir):
    agent, api = start_http_agent()
    token_file = data_dir / "token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    api.json("GET", "/tasks")
    response, _ = api.request("GET", "/tasks", token="wrong")
    assert response.status == 401
    agent.wait_for_log('"GET /tasks HTTP/1.1" 401')
    assert str(token_file) in agent.log
    assert api.token not in agent.log


def test_run_answers_like_the_seeds_curl_examples(start_http_agent):
    agent, api = start_http_agent()
    response, body = api.request("POST", "/run", {"command": "python3",
                                                  "args": ["-c", 'print("hello world")']})
    assert (response.status, body) == (200, b"hello world\n")
    assert response.getheader("X-Exit-Code") == "0"
    response, body = api.request("POST", "/run", {"command": "cat", "args": [str(REPO / "README.md")]})
    assert body == (REPO / "README.md").read_bytes()


def test_http_timeouts_are_seconds_whatever_the_tcp_unit(start_http_agent):
    agent, api = start_http_agent("--timeout-unit", "ms")
    response, _ = api.request("POST", "/run", {"command": "sleep", "args": ["0.2"], "timeout": 5})
    assert (response.getheader("X-Task-State"), response.getheader("X-Exit-Code")) == \
        ("succeeded", "0")
    response, _ = api.request("POST", "/run", {"command": "sleep", "args": ["5"], "timeout": 0.2})
    assert response.getheader("X-Task-State") == "timed_out"


def test_tcp_tasks_are_in_the_http_history(start_http_agent):
    agent, api = start_http_agent()
    client = agent.connect()
    client.send({"command": ["echo", "from", "tcp"], "id": "t-1"})  # an id: its stdout is kept
    assert client.receive()["output"] == "from tcp\n"
    newest = api.json("GET", "/tasks?limit=1")["tasks"][0]
    assert (newest["command"], newest["source"], newest["state"], newest["request_id"]) == \
        (["echo", "from", "tcp"], "tcp", "succeeded", "t-1")
    _, output = api.request("GET", f"/tasks/{newest['id']}/output")
    assert output == b"from tcp\n"
    client.close()


def test_history_and_output_survive_a_restart(start_http_agent):
    agent, api = start_http_agent()
    done = api.json("POST", "/tasks", {"command": "sh", "args": ["-c", "echo kept; echo too >&2"]},
                    expect=201)
    api.wait_for(done["id"], "succeeded")
    running = api.json("POST", "/tasks", {"command": "sleep", "args": ["300"]}, expect=201)
    assert agent.stop() == 0
    agent, api = start_http_agent()
    assert api.json("GET", f"/tasks/{done['id']}")["state"] == "succeeded"
    assert api.request("GET", f"/tasks/{done['id']}/output?stream=both")[1] in (b"kept\ntoo\n",
                                                                                 b"too\nkept\n")
    stopped = api.json("GET", f"/tasks/{running['id']}")
    assert (stopped["state"], stopped["error"]) == ("cancelled", "agent shutting down")


def test_after_kill_9_running_tasks_are_lost_and_their_groups_killed(start_http_agent):
    agent, api = start_http_agent()
    done = api.json("POST", "/tasks", {"command": "echo", "args": ["before the crash"]}, expect=201)
    api.wait_for(done["id"], "succeeded")
    shell = api.json("POST", "/tasks", {"command": "sh", "args": [
        "-c", "echo started; sleep 300 & sleep 300 & wait"]}, expect=201)
    deadline = time.monotonic() + 10
    while len(group_members(shell["pid"])) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(group_members(shell["pid"])) == 3
    api.json("GET", f"/tasks/{shell['id']}")  # its record is on disk before the crash
    agent.kill_9_with_its_watchdog()  # else the watchdog kills them: the restart is tested here
    assert len(group_members(shell["pid"])) == 3, "with no watchdog, the tasks outlive the agent"

    agent, api = start_http_agent()
    assert not wait_until_empty(group_members, shell["pid"]), "the restart kills what was left"
    lost = api.json("GET", f"/tasks/{shell['id']}")
    assert (lost["state"], lost["exit_code"]) == ("lost", -1)
    assert "agent stopped while the task was running" in lost["error"]
    assert lost["stdout_bytes"] == len(b"started\n")
    assert api.request("GET", f"/tasks/{done['id']}/output")[1] == b"before the crash\n"
    assert "marked lost" in agent.log


def test_the_api_is_off_unless_asked_for(start_agent, tmp_path):
    agent = start_agent("--data-dir", str(tmp_path / "d"))
    assert "HTTP API" not in agent.ports
    assert not (tmp_path / "d" / "token").exists()


def test_a_second_agent_on_the_same_data_dir_refuses_to_start(start_http_agent, data_dir, tmp_path):
    start_http_agent()
    proc = subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "agent", "--listen", "tcp:0:interface=127.0.0.1",
         "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    assert "in use by another agent" in proc.stdout + proc.stderr
