"""GET /metrics of a real `twistd -n agent`, after a task through each door."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.test_http_agent import data_dir, start_http_agent  # noqa: F401


def _samples(body: bytes) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode("utf-8"))
            for s in family.samples}


def test_tasks_from_both_doors_are_counted(start_http_agent):
    agent, api = start_http_agent()
    client = agent.connect()
    client.send({"command": ["true"]})
    assert client.receive()["exit_code"] == 0
    client.send(b"{not json\n")
    assert client.receive()["exit_code"] == -1
    client.close()
    response, body = api.request("POST", "/run", {"command": "true"})
    assert response.status == 200
    response, body = api.request("GET", "/metrics")
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/plain")
    samples = _samples(body)
    for door in ("tcp", "http"):
        assert samples[("agent_tasks_total", (("door", door), ("state", "succeeded")))] == 1
        assert samples[("agent_task_duration_seconds_count", (("door", door),))] == 1
    assert samples[("agent_refusals_total", (("door", "tcp"), ("reason", "bad_request")))] == 1
    assert samples[("agent_history_writable", ())] == 1
    assert samples[("process_resident_memory_bytes", ())] > 0
    assert samples[("agent_escapees_killed_total", ())] == 0


def test_metrics_need_the_token(start_http_agent):
    agent, api = start_http_agent()
    response, _ = api.request("GET", "/metrics", token="wrong")
    assert response.status == 401
