"""The agent's metrics, fed by a real Engine over fake children (tests.fakes.FakeHost)."""
from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.core.decisions import Busy, KeyConflict, QueueFull
from agent.core.lanes import Lane
from agent.core.request import TaskRequest
from agent.history.prune import Usage
from agent.metrics import FleetGauges, Metrics
from tests.fakes import FakeHost, StdoutCollector, exit_with

SECRET_ARG = "s3cr3t-argument-0xdeadbeef"
KEY = "my-idempotency-key-42"


class Agent:
    """An engine whose every hook feeds one Metrics, as agent.service.build wires them."""

    def __init__(self, health=None, usage=None, escapees_killed=None):
        self.health = health or {"writable": True, "waiting": 0, "dropped": 0}
        self.fleet: FleetGauges | None = None
        self.metrics = Metrics(live=lambda: self.engine.live.values(),
                               health=lambda: self.health, usage=lambda: usage,
                               escapees_killed=lambda: escapees_killed,
                               fleet=lambda: self.fleet)
        host = FakeHost(observers=[self.metrics.observe],
                        cleanup_observers=[self.metrics.observe_cleanup],
                        refusal_observers=[self.metrics.refused])
        self.clock, self.spawn, self.kills, self.engine = (host.clock, host.spawn, host.kills,
                                                           host.engine)

    def admit(self, lane: Lane, *args: str, source: str = "tcp", key: str | None = None):
        request = TaskRequest(("cmd", *args), None, id=key)
        return self.engine.admit(request, lane, StdoutCollector(), source)

    def samples(self) -> dict[tuple[str, tuple], float]:
        """{(sample name, sorted labels): value} from the exposition, parsed as Prometheus would."""
        text = self.metrics.exposition().decode("utf-8")
        return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}

    def value(self, name: str, **labels) -> float | None:
        return self.samples().get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def agent():
    return Agent()


def test_an_ended_task_is_counted_by_door_and_state(agent):
    lane = Lane(0)
    agent.admit(lane, source="tcp")
    agent.admit(lane, source="http")
    agent.admit(lane, source="http")
    exit_with(agent.spawn.protocol(0), 0)
    exit_with(agent.spawn.protocol(1), 3)
    exit_with(agent.spawn.protocol(2), 0)
    assert agent.value("agent_tasks_total", door="tcp", state="succeeded") == 1
    assert agent.value("agent_tasks_total", door="http", state="succeeded") == 1
    assert agent.value("agent_tasks_total", door="http", state="failed") == 1
    assert agent.value("agent_tasks_total", door="tcp", state="failed") == 0


def test_a_timed_out_task_is_counted_as_timed_out(agent):
    agent.engine.admit(TaskRequest(("cmd",), 1.0), Lane(0), StdoutCollector(), "tcp")
    agent.clock.advance(1.0)
    exit_with(agent.spawn.protocol(), signal=15)
    agent.clock.pump([0.05] * 10)
    assert agent.value("agent_tasks_total", door="tcp", state="timed_out") == 1


def test_the_duration_lands_in_its_bucket(agent):
    agent.admit(Lane(0), source="http")
    agent.clock.advance(0.3)
    exit_with(agent.spawn.protocol(), 0)
    assert agent.value("agent_task_duration_seconds_count", door="http") == 1
    assert agent.value("agent_task_duration_seconds_sum", door="http") == pytest.approx(0.3)
    assert agent.value("agent_task_duration_seconds_bucket", door="http", le="0.25") == 0
    assert agent.value("agent_task_duration_seconds_bucket", door="http", le="0.5") == 1
    assert agent.value("agent_task_duration_seconds_bucket", door="tcp", le="+Inf") == 0


def test_buckets_span_5_ms_to_6_hours(agent):
    bounds = {labels for name, labels in agent.samples()
              if name == "agent_task_duration_seconds_bucket" and ("door", "tcp") in labels}
    les = sorted(float(dict(labels)["le"]) for labels in bounds)
    assert les[0] == 0.005 and les[-2] == 6 * 3600 and les[-1] == float("inf")


def test_running_and_queued_are_gauges_by_door(agent):
    lane = Lane(1, queue=True)
    agent.admit(lane, source="tcp")
    agent.admit(lane, source="tcp")
    assert agent.value("agent_tasks_running", door="tcp") == 1
    assert agent.value("agent_tasks_queued", door="tcp") == 1
    assert agent.value("agent_tasks_running", door="http") == 0
    exit_with(agent.spawn.protocol(0), 0)
    assert agent.value("agent_tasks_running", door="tcp") == 1
    assert agent.value("agent_tasks_queued", door="tcp") == 0
    exit_with(agent.spawn.protocol(1), 0)
    assert agent.value("agent_tasks_running", door="tcp") == 0


def test_refusals_are_counted_by_door_and_reason(agent):
    full = Lane(1)
    agent.admit(full, source="http")
    refused = agent.admit(full, source="http")
    assert refused.result.check(Busy)
    refused.addErrback(lambda _: None)
    queue = Lane(1, queue=True, max_waiting=1)
    agent.admit(queue, source="tcp")
    agent.admit(queue, source="tcp")
    refused = agent.admit(queue, source="tcp")
    assert refused.result.check(QueueFull)
    refused.addErrback(lambda _: None)
    assert agent.value("agent_refusals_total", door="http", reason="busy") == 1
    assert agent.value("agent_refusals_total", door="tcp", reason="queue_full") == 1


def test_a_key_conflict_and_shutting_down_are_refusals(agent):
    lane = Lane(0)
    agent.admit(lane, "a", key=KEY)
    conflict = agent.admit(lane, "b", key=KEY)
    assert conflict.result.check(KeyConflict)
    conflict.addErrback(lambda _: None)
    agent.engine.cancel_all("stopping")
    agent.admit(lane).addErrback(lambda _: None)
    assert agent.value("agent_refusals_total", door="tcp", reason="key_conflict") == 1
    assert agent.value("agent_refusals_total", door="tcp", reason="shutting_down") == 1


def test_a_door_counts_its_own_refusals_through_the_engine(agent):
    agent.engine.refused("tcp", "bad_request")
    agent.engine.refused("tcp", "bad_request")
    assert agent.value("agent_refusals_total", door="tcp", reason="bad_request") == 2


def test_an_incomplete_cleanup_is_counted(agent):
    lane = Lane(0)
    clean, stuck = agent.admit(lane, "a").result.task, agent.admit(lane, "b").result.task
    agent.kills.survivors.add(stuck.runner.pid)
    exit_with(clean.runner)
    exit_with(stuck.runner)
    assert agent.value("agent_cleanups_incomplete_total") == 0
    agent.clock.pump([0.05] * 200)
    assert stuck.cleanup == "incomplete"
    assert agent.value("agent_cleanups_incomplete_total") == 1


def test_the_history_health_and_disk_use_are_read_at_scrape_time():
    agent = Agent(health={"writable": False, "error": "disk full", "waiting": 7, "dropped": 2},
                  usage=Usage(database_bytes=4096, output_bytes=12345, rows=3),
                  escapees_killed=5)
    assert agent.value("agent_history_writable") == 0
    assert agent.value("agent_history_records_waiting") == 7
    assert agent.value("agent_history_records_dropped_total") == 2
    assert agent.value("agent_history_output_bytes") == 12345
    assert agent.value("agent_history_database_bytes") == 4096
    assert agent.value("agent_escapees_killed_total") == 5
    agent.health = {"writable": True, "waiting": 0, "dropped": 2}
    assert agent.value("agent_history_writable") == 1


def test_what_is_not_known_is_not_shown(agent):
    names = {name for name, _ in agent.samples()}
    assert "agent_history_output_bytes" not in names
    assert "agent_escapees_killed_total" not in names


def test_a_fleet_node_shows_its_tasks_lease_claims_and_reports(agent):
    agent.fleet = FleetGauges(running=2, lease_valid=True, since_renewal=1.5, claims=9,
                              reports={"recorded": 6, "stale": 1})
    assert agent.value("agent_fleet_tasks_running") == 2
    assert agent.value("agent_fleet_lease_valid") == 1
    assert agent.value("agent_fleet_heartbeat_age_seconds") == 1.5
    assert agent.value("agent_fleet_claims_total") == 9
    assert agent.value("agent_fleet_reports_total", result="recorded") == 6
    assert agent.value("agent_fleet_reports_total", result="stale") == 1
    assert agent.value("agent_fleet_reports_total", result="already") == 0
    agent.fleet = FleetGauges(running=0, lease_valid=False, since_renewal=None, claims=9)
    assert agent.value("agent_fleet_lease_valid") == 0
    assert agent.value("agent_fleet_heartbeat_age_seconds") is None


def test_an_agent_not_in_a_fleet_shows_no_fleet_metric(agent):
    assert not [name for name, _ in agent.samples() if name.startswith("agent_fleet_")]


def test_the_process_collector_is_included(agent):
    names = {name for name, _ in agent.samples()}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes",
            "process_open_fds"} <= names


def test_no_label_carries_a_command_an_argument_an_id_or_a_key(agent):
    lane = Lane(1)
    started = agent.admit(lane, SECRET_ARG, key=KEY, source="http").result.task
    agent.admit(lane, SECRET_ARG, source="http").addErrback(lambda _: None)
    exit_with(agent.spawn.protocol(), 0)
    text = agent.metrics.exposition().decode()
    for secret in ("cmd", SECRET_ARG, KEY, started.id):
        assert secret not in text
    labels = {key for _, pairs in agent.samples() for key, _ in pairs}
    assert labels <= {"door", "state", "reason", "le"}


def test_two_agents_in_one_process_keep_their_own_counts():
    one, two = Agent(), Agent()
    one.admit(Lane(0))
    exit_with(one.spawn.protocol(), 0)
    assert one.value("agent_tasks_total", door="tcp", state="succeeded") == 1
    assert two.value("agent_tasks_total", door="tcp", state="succeeded") == 0
