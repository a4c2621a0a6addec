"""A real `twistd -n agent --fleet` against the suite's PostgreSQL, its fleet read and driven
through its HTTP door by the installed agentctl: submit, run on the node, the record with its
tails and the link to the whole output, cancel, and the node's metrics."""
from __future__ import annotations

import json
import time
import urllib.request

from tests.e2e.test_ctl import agentctl, one_line_error

DOORS = ("TCP task protocol", "HTTP API")
ADVERTISED = "http://node-e2e.example:8080"
KEY = "job/1 ü"


def test_a_fleet_task_submitted_through_agentctl_runs_and_its_record_leads_to_its_output(
        start_agent, fleet_dsn, tmp_path):
    agent = start_agent("--http", "tcp:0:interface=127.0.0.1", "--data-dir", str(tmp_path / "d"),
                        "--fleet", fleet_dsn, "--node-id", "e2e-1", "--fleet-url", ADVERTISED,
                        "--fleet-poll", "0.2", "--kill-grace", "0.5", doors=DOORS)
    agent.wait_for_log("joined the fleet", timeout=15)
    agent.home = tmp_path
    agent.url = f"http://127.0.0.1:{agent.ports['HTTP API']}"
    agent.token_file = tmp_path / "d" / "token"

    [node] = _json(agentctl(agent, "nodes", "--json"))
    assert (node["id"], node["state"], node["http"]) == ("e2e-1", "up", ADVERTISED)

    submitted = agentctl(agent, "fleet", "submit", "--id", KEY, "--",
                         "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (submitted.returncode, submitted.stdout.decode()) == (0, KEY + "\n"), submitted
    task = _until(agent, KEY, "finished")
    assert (task["exit_code"], task["ending"], task["node_id"]) == (3, "exited", "e2e-1")
    assert (task["stdout_tail"], task["stderr_tail"]) == ("out\n", "err\n")
    assert [(a["attempt"], a["node_id"], a["exit_code"]) for a in task["attempts"]] == \
        [(1, "e2e-1", 3)]
    local = task["output"]["local_task_id"]
    assert task["output"]["url"] == f"{ADVERTISED}/tasks/{local}/output"
    assert _get(agent, f"/tasks/{local}/output") == b"out\n"  # the node keeps the whole of it
    shown = agentctl(agent, "fleet", "show", KEY).stdout.decode()
    assert f"output: node e2e-1, task {local}, {ADVERTISED}" in shown

    again = agentctl(agent, "fleet", "submit", "--id", KEY, "--", "echo", "another")
    assert again.returncode == 125
    assert "is already used by another command (HTTP 409)" in one_line_error(again)

    agentctl(agent, "fleet", "submit", "--id", "long", "--", "sleep", "60")
    _until(agent, "long", "running")
    cancelled = agentctl(agent, "fleet", "cancel", "long")
    assert cancelled.stdout.decode() == "long cancelling (node e2e-1 was told)\n"
    assert _until(agent, "long", "cancelled")["ending"] == "cancelled"

    listed = _json(agentctl(agent, "fleet", "list", "--json", "--node", "e2e-1"))
    assert [t["key"] for t in listed] == ["long", KEY]
    metrics = _get(agent, "/metrics").decode()
    assert "agent_fleet_claims_total 2.0" in metrics
    assert 'agent_fleet_reports_total{result="recorded"} 2.0' in metrics
    assert "agent_fleet_lease_valid 1.0" in metrics and "agent_fleet_tasks_running 0.0" in metrics


def _json(result):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _until(agent, key: str, state: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        task = _json(agentctl(agent, "fleet", "show", "--json", key))
        if task["state"] == state:
            return task
        assert time.monotonic() < deadline, f"{key} still {task['state']}, not {state}"
        time.sleep(0.1)


def _get(agent, path: str) -> bytes:
    token = agent.token_file.read_text().strip()
    request = urllib.request.Request(agent.url + path,
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()
