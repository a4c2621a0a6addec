"""GET /metrics: the agent's metrics in the Prometheus text format, behind the token.

Against the in-memory API (tests/doors/http/memory.py): the real site, store and engine."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.doors.http.memory import make_memory_api, memory_api  # noqa: F401


def _samples(answer) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.body.decode("utf-8"))
            for s in family.samples}


def _refusals(api, reason: str) -> float | None:
    samples = _samples(api.request("GET", "/metrics"))
    return samples.get(("agent_refusals_total", (("door", "http"), ("reason", reason))))


def test_metrics_need_the_token(memory_api):
    answer = memory_api.request("GET", "/metrics", token=None)
    assert answer.code == 401
    assert answer.header("WWW-Authenticate") is not None


def test_metrics_are_the_prometheus_text_format(memory_api):
    answer = memory_api.request("GET", "/metrics")
    assert answer.code == 200
    assert answer.header("Content-Type")[0].startswith("text/plain; version=")
    names = {family.name for family in
             text_string_to_metric_families(answer.body.decode("utf-8"))}
    assert {"agent_tasks", "agent_task_duration_seconds", "agent_tasks_running",
            "agent_tasks_queued", "agent_refusals", "agent_history_writable",
            "agent_history_records_waiting", "agent_cleanups_incomplete"} <= names


def test_an_http_task_is_counted_once_it_ends(memory_api):
    task = memory_api.start("true")
    samples = _samples(memory_api.request("GET", "/metrics"))
    assert samples[("agent_tasks_running", (("door", "http"),))] == 1
    memory_api.finish(task["id"], seconds=0.02)
    samples = _samples(memory_api.request("GET", "/metrics"))
    assert samples[("agent_tasks_total", (("door", "http"), ("state", "succeeded")))] == 1
    assert samples[("agent_tasks_running", (("door", "http"),))] == 0


def test_a_missing_token_and_a_malformed_body_are_refusals(memory_api):
    memory_api.request("GET", "/tasks", token=None)
    memory_api.request("POST", "/tasks", raw=b"{not json")
    memory_api.request("POST", "/tasks", {"command": 5})
    assert _refusals(memory_api, "unauthorised") == 1
    assert _refusals(memory_api, "bad_request") == 2


def test_a_busy_refusal_is_counted_once(make_memory_api):
    api = make_memory_api(max_running=1)
    api.start("sleep", "30")
    assert api.request("POST", "/tasks", {"command": "true"}).code == 429
    assert _refusals(api, "busy") == 1
    assert _refusals(api, "too_many_tasks") is None


def test_a_not_found_is_no_refusal(memory_api):
    assert memory_api.request("GET", "/tasks/" + "0" * 32).code == 404
    samples = _samples(memory_api.request("GET", "/metrics"))
    assert not [key for key in samples if key[0] == "agent_refusals_total"]
