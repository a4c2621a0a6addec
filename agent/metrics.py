"""The agent's Prometheus metrics: what its tasks, refusals, history and process are doing.

Counted as it happens on the reactor thread (the engine's observers: a counter and a
histogram per ended task, children cached so no label lookup is paid per task), and read
at scrape time for everything the agent already knows (live tasks, the history's health,
the last measured disk use), so a gauge costs a task nothing. Every agent has its own
CollectorRegistry (tests build many agents in one process), rendered on the reactor
thread by the HTTP door's GET /metrics: prometheus_client's own MetricsResource would
render on Twisted's thread pool, beside the history's blocking work.

No label carries a command, an id, a key or a token's name: doors, states and reasons
are a few fixed words each (docs/metrics.md lists them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram,
                               ProcessCollector, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agent.core.task import Task
from agent.history.prune import Usage
from agent.history.records import state_of

CONTENT_TYPE = CONTENT_TYPE_LATEST.encode("ascii")
"""The exposition's Content-Type: prometheus_client's CONTENT_TYPE_LATEST (the text format)."""

DOORS = ("tcp", "http")
"""The doors every per-door series is shown for from the start (at 0)."""

ENDED_STATES = ("succeeded", "failed", "timed_out", "cancelled")
"""The end states agent_tasks_total starts with at 0 for each door (others appear when seen)."""

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                    600, 1800, 3600, 7200, 21600)
"""Seconds, 5 ms (a `true`) to 6 h (a long batch job); slower tasks land in +Inf."""


REPORT_RESULTS = ("recorded", "already", "stale")
"""The database's answers to a fleet node's result; agent_fleet_reports_total starts each at 0."""


@dataclass(frozen=True)
class FleetGauges:
    """What a fleet node (agent.doors.fleet) says of itself at scrape time."""

    running: int
    """Fleet tasks it holds now (claimed, results not yet recorded)."""
    lease_valid: bool
    since_renewal: float | None
    """Seconds since its lease was last renewed; None before the first renewal."""
    claims: int
    reports: Mapping[str, int] = field(default_factory=dict)
    """Results sent, by the database's answer (REPORT_RESULTS)."""


class Metrics:
    """One agent's metrics. Feed it from the engine (observe, observe_cleanup, refused)
    and serve exposition() on GET /metrics."""

    def __init__(self, *, live: Callable[[], Iterable[Task]],
                 health: Callable[[], dict] = lambda: {"writable": True, "waiting": 0},
                 usage: Callable[[], Usage | None] = lambda: None,
                 escapees_killed: Callable[[], int | None] = lambda: None,
                 fleet: Callable[[], FleetGauges | None] = lambda: None,
                 process: bool = True):
        """live: the engine's live tasks (queued and running) at scrape time.
        health: the history's health (agent.history.store.Store.health).
        usage: the data dir's last measured use, None until measured.
        escapees_killed: escaped processes killed so far, None without a reaper.
        fleet: this node's fleet figures, None when it is not in a fleet.
        process: include the process collector (CPU, memory, open files)."""
        self.registry = CollectorRegistry()
        self._tasks = Counter("agent_tasks", "Tasks ended, by the door that started them and "
                              "how they ended", ["door", "state"], registry=self.registry)
        self._duration = Histogram("agent_task_duration_seconds", "How long ended tasks ran, "
                                   "from start to end", ["door"], buckets=DURATION_BUCKETS,
                                   registry=self.registry)
        self._refusals = Counter("agent_refusals", "Requests refused, by door and reason "
                                 "(nothing was started)", ["door", "reason"],
                                 registry=self.registry)
        self._incomplete = Counter("agent_cleanups_incomplete", "Ended tasks whose process "
                                   "group still had members after repeated SIGKILL",
                                   registry=self.registry)
        self._ended: dict[tuple[str, str], Counter] = {}
        self._durations: dict[str, Histogram] = {}
        self._refused: dict[tuple[str, str], Counter] = {}
        for door in DOORS:
            self._duration_of(door)
            for state in ENDED_STATES:
                self._ended_of(door, state)
        self.registry.register(_Snapshot(live, health, usage, escapees_killed))
        self.registry.register(_FleetSnapshot(fleet))
        if process:
            ProcessCollector(registry=self.registry)

    # -- fed by the engine

    def observe(self, task: Task) -> None:
        """Engine observer: an ended task counts once, with its duration."""
        if task.state != "finished":
            return
        self._ended_of(task.source, state_of(task)).inc()
        duration_ms = task.outcome.duration_ms
        if duration_ms is not None:  # None: dropped from the queue before it ran
            self._duration_of(task.source).observe(duration_ms / 1000)

    def observe_cleanup(self, task: Task) -> None:
        """Engine cleanup observer: count a process group that could not be emptied."""
        if task.cleanup == "incomplete":
            self._incomplete.inc()

    def refused(self, door: str, reason: str) -> None:
        """Engine refusal observer: a request refused by admission or by a door."""
        child = self._refused.get((door, reason))
        if child is None:
            child = self._refused[door, reason] = self._refusals.labels(door, reason)
        child.inc()

    # -- read by GET /metrics

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format (CONTENT_TYPE)."""
        return generate_latest(self.registry)

    def _ended_of(self, door: str, state: str) -> Counter:
        child = self._ended.get((door, state))
        if child is None:
            child = self._ended[door, state] = self._tasks.labels(door, state)
        return child

    def _duration_of(self, door: str) -> Histogram:
        child = self._durations.get(door)
        if child is None:
            child = self._durations[door] = self._duration.labels(door)
        return child


class _Snapshot:
    """The metrics read at scrape time from what the agent already keeps."""

    def __init__(self, live, health, usage, escapees_killed):
        self._live = live
        self._health = health
        self._usage = usage
        self._escapees_killed = escapees_killed

    def collect(self):
        yield from self._tasks_now()
        health = self._health()
        yield GaugeMetricFamily("agent_history_writable", "1 while the task history can be "
                                "written, 0 while it cannot (see /healthz)",
                                value=1 if health["writable"] else 0)
        yield GaugeMetricFamily("agent_history_records_waiting", "Task records kept in memory "
                                "until the history can be written again",
                                value=health.get("waiting", 0))
        yield CounterMetricFamily("agent_history_records_dropped", "Task records given up on "
                                  "while the history could not be written",
                                  value=health.get("dropped", 0))
        usage = self._usage()
        if usage is not None:
            yield GaugeMetricFamily("agent_history_output_bytes", "Task output the history "
                                    "keeps on disk, as last measured by retention",
                                    value=usage.output_bytes)
            yield GaugeMetricFamily("agent_history_database_bytes", "The history database's "
                                    "files on disk, as last measured by retention",
                                    value=usage.database_bytes)
        killed = self._escapees_killed()
        if killed is not None:
            yield CounterMetricFamily("agent_escapees_killed", "Processes that left their "
                                      "task's process group and were killed", value=killed)

    def _tasks_now(self):
        counts = {(door, state): 0 for door in DOORS for state in ("queued", "running")}
        for task in self._live():
            key = (task.source, task.state)
            counts[key] = counts.get(key, 0) + 1
        running = GaugeMetricFamily("agent_tasks_running", "Tasks running now, by door",
                                    labels=["door"])
        queued = GaugeMetricFamily("agent_tasks_queued", "Tasks waiting for a free slot now, "
                                   "by door", labels=["door"])
        for (door, state), count in sorted(counts.items()):
            if state == "running":
                running.add_metric([door], count)
            elif state == "queued":
                queued.add_metric([door], count)
        return running, queued


class _FleetSnapshot:
    """This node's part in a fleet, read at scrape time; nothing without --fleet."""

    def __init__(self, fleet: Callable[[], FleetGauges | None]):
        self._fleet = fleet

    def collect(self):
        gauges = self._fleet()
        if gauges is None:
            return
        yield GaugeMetricFamily("agent_fleet_tasks_running", "Fleet tasks this node holds now: "
                                "claimed, their results not yet recorded",
                                value=gauges.running)
        yield GaugeMetricFamily("agent_fleet_lease_valid", "1 while this node's fleet lease is "
                                "renewed, 0 once it has fenced or lost it",
                                value=1 if gauges.lease_valid else 0)
        if gauges.since_renewal is not None:
            yield GaugeMetricFamily("agent_fleet_heartbeat_age_seconds", "Seconds since this "
                                    "node's lease was last renewed (heartbeat every lease/5)",
                                    value=gauges.since_renewal)
        yield CounterMetricFamily("agent_fleet_claims", "Fleet tasks this node claimed",
                                  value=gauges.claims)
        reports = CounterMetricFamily("agent_fleet_reports", "Fleet results this node sent, by "
                                      "the database's answer: recorded, already (a retry), "
                                      "stale (refused: the attempt was no longer this node's)",
                                      labels=["result"])
        for result in sorted({*REPORT_RESULTS, *gauges.reports}):
            reports.add_metric([result], gauges.reports.get(result, 0))
        yield reports
