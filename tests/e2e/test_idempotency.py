"""Idempotent submission on a real agent: a request whose id the agent knows is never run again."""
from __future__ import annotations

import http.client
import json
import time

from tests.e2e.test_http_agent import Api, DOORS, data_dir, start_http_agent  # noqa: F401


def _counting(marker, text: str = "hi", wait_for=None) -> list[str]:
    """argv appending a line to marker each time it runs (optionally waiting for a file first),
    then printing text: the marker counts the runs."""
    wait = f"while [ ! -e {wait_for} ]; do sleep 0.01; done; " if wait_for else ""
    return ["sh", "-c", f"echo ran >> {marker}; {wait}printf {text}"]


def _runs(marker) -> int:
    return len(marker.read_text().splitlines()) if marker.exists() else 0


def test_a_repeated_tcp_id_answers_the_first_result_without_running_again(start_agent, tmp_path):
    marker = tmp_path / "runs"
    agent = start_agent("--data-dir", str(tmp_path / "data"))
    first_client = agent.connect()
    first_client.send({"command": _counting(marker), "id": "job-1"})
    first = first_client.receive()
    second_client = agent.connect()
    second_client.send({"command": _counting(marker), "id": "job-1"})
    again = second_client.receive()
    assert _runs(marker) == 1
    assert (first["exit_code"], first["output"], "replayed" in first) == (0, "hi", False)
    assert again["replayed"] is True
    assert {k: again[k] for k in ("command", "executed_at", "duration_ms", "exit_code", "error",
                                  "id")} == \
        {k: first[k] for k in ("command", "executed_at", "duration_ms", "exit_code", "error", "id")}
    # the stdout of a task with an id is kept, so the retry gets back what it came for
    assert (again["output"], "output_dropped" in again) == ("hi", False)


def test_a_replay_carries_the_output_even_after_a_restart(start_agent, tmp_path):
    marker = tmp_path / "runs"
    data = str(tmp_path / "data")
    agent = start_agent("--data-dir", data)
    client = agent.connect()
    client.send({"command": _counting(marker, "kept"), "id": "job-2"})
    assert client.receive()["output"] == "kept"
    client.close()
    assert agent.stop() == 0
    restarted = start_agent("--data-dir", data)
    client = restarted.connect()
    client.send({"command": _counting(marker, "kept"), "id": "job-2"})
    again = client.receive()
    assert (again["output"], again["replayed"], "output_dropped" in again) == ("kept", True, False)
    assert _runs(marker) == 1


def test_a_retry_while_the_task_runs_waits_for_it_and_keeps_it_alive(start_agent, tmp_path):
    marker, gate = tmp_path / "runs", tmp_path / "go"
    agent = start_agent("--data-dir", str(tmp_path / "data"))
    request = {"command": _counting(marker, "once", wait_for=gate), "id": "job-3"}
    first, retry = agent.connect(), agent.connect()
    first.send(request)
    _wait_for(lambda: _runs(marker) == 1)
    retry.send(request)
    time.sleep(0.3)  # let the retry attach before the first client goes
    first.close()    # the first client leaves; the retry still holds the task
    time.sleep(0.5)
    gate.touch()
    result = retry.receive()
    assert (result["exit_code"], result["output"], result["replayed"]) == (0, "once", True)
    assert _runs(marker) == 1


def test_a_known_id_with_another_command_is_refused_and_runs_nothing(start_agent, tmp_path):
    marker = tmp_path / "runs"
    agent = start_agent("--data-dir", str(tmp_path / "data"))
    client = agent.connect()
    client.send({"command": ["true"], "id": "job-4"})
    assert client.receive()["exit_code"] == 0
    client.send({"command": _counting(marker), "id": "job-4"})
    refused = client.receive()
    assert refused["exit_code"] == -1 and "already used for another command" in refused["error"]
    assert _runs(marker) == 0


def test_a_busy_refusal_is_not_remembered_so_its_retry_runs(start_agent, tmp_path):
    gate = tmp_path / "go"
    agent = start_agent("--data-dir", str(tmp_path / "data"))
    client = agent.connect()
    client.send({"command": ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.01; done"]},
                {"command": ["echo", "later"], "id": "job-5"})
    assert client.receive()["error"] == "cannot allow concurrent executions"
    gate.touch()
    client.receive()
    client.send({"command": ["echo", "later"], "id": "job-5"})
    assert client.receive()["output"] == "later\n"


def test_http_idempotency_key_starts_one_task_and_answers_it_again(start_http_agent, tmp_path):
    marker = tmp_path / "runs"
    agent, api = start_http_agent()
    argv = _counting(marker)
    body = {"command": argv[0], "args": argv[1:]}
    first, created = _post(api, "/tasks", body, {"Idempotency-Key": "deploy-7"})
    assert first.status == 201
    again, same = _post(api, "/tasks", body, {"Idempotency-Key": "deploy-7"})
    assert (again.status, again.getheader("Idempotent-Replayed")) == (200, "true")
    assert same["id"] == created["id"] and same["request_id"] == "deploy-7"
    api.wait_for(created["id"], "succeeded")
    in_body, by_field = _post(api, "/tasks", {**body, "id": "deploy-7"})
    assert (in_body.status, by_field["id"], by_field["state"]) == (200, created["id"], "succeeded")
    other, refused = _post(api, "/tasks", {"command": "true"}, {"Idempotency-Key": "deploy-7"})
    assert other.status == 422 and "another command" in refused["error"]
    assert _runs(marker) == 1


def test_one_key_space_for_both_doors_and_run_replays_stdout(start_http_agent, tmp_path):
    marker = tmp_path / "runs"
    agent, api = start_http_agent()
    argv = _counting(marker, "both")
    client = agent.connect()
    client.send({"command": argv, "id": "shared-1"})
    tcp_task = client.receive()
    assert tcp_task["output"] == "both"
    response, record = _post(api, "/tasks", {"command": argv[0], "args": argv[1:]},
                             {"Idempotency-Key": "shared-1"})
    assert (response.status, record["source"], record["state"]) == (200, "tcp", "succeeded")
    ran = _raw(api, "/run", {"command": argv[0], "args": argv[1:], "id": "run-1"})
    rerun = _raw(api, "/run", {"command": argv[0], "args": argv[1:], "id": "run-1"})
    assert (ran[0].status, ran[1], rerun[0].status, rerun[1]) == (200, b"both", 200, b"both")
    assert rerun[0].getheader("Idempotent-Replayed") == "true"
    assert rerun[0].getheader("X-Task-Id") == ran[0].getheader("X-Task-Id")
    assert _runs(marker) == 2  # one TCP task, one /run task


def _post(api: Api, path: str, body, headers=None):
    response, data = _raw(api, path, body, headers)
    return response, json.loads(data)


def _raw(api: Api, path: str, body, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=30)
    connection.request("POST", path, json.dumps(body),
                       {"Authorization": f"Bearer {api.token}", **(headers or {})})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response, data


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def test_both_waiters_of_a_large_result_get_all_of_it(start_agent, tmp_path):
    gate = tmp_path / "go"
    agent = start_agent("--data-dir", str(tmp_path / "data"))
    request = {"command": ["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.01; done; "
                                       "head -c 3000000 /dev/zero | tr '\\0' x"], "id": "big"}
    first, retry = agent.connect(), agent.connect()
    first.send(request)
    time.sleep(0.2)
    retry.send(request)
    time.sleep(0.2)
    gate.touch()
    results = [first.receive(), retry.receive()]
    assert [len(r["output"]) for r in results] == [3_000_000, 3_000_000]
    assert set(results[0]["output"]) == set(results[1]["output"]) == {"x"}
    assert results[1]["replayed"] is True
