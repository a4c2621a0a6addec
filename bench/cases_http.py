"""The HTTP cases: endless output, follow latency, history.

They need the HTTP door (`--http`); on a checkout without it they report
"skipped" instead of failing, so the suite runs on every branch. The client
is the standard library's http.client: one connection per request, no
framework between the socket and the figures.
"""
from __future__ import annotations

import functools
import http.client
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench.agentproc import Agent, agent_help
from bench.table import MIB, Row, skipped

NOT_AVAILABLE = "HTTP API not available"
DOORS = ("TCP task protocol", "HTTP API")


@functools.cache
def http_available() -> bool:
    return "--http" in agent_help()


class HttpAgent(Agent):
    """An agent with both doors and a data directory of its own (or a given one)."""

    def __init__(self, *args: str, data_dir: str | None = None):
        self._own_data = None if data_dir else tempfile.TemporaryDirectory(prefix="agent-data-")
        self.data_dir = data_dir or self._own_data.name
        super().__init__("--http", "tcp:0:interface=127.0.0.1", "--data-dir", self.data_dir,
                         *args, doors=DOORS)
        self.token = Path(self.data_dir, "token").read_text().strip()

    def request(self, method: str, path: str, body: dict | None = None,
                timeout: float = 60) -> http.client.HTTPResponse:
        """Send one request on a fresh connection; the caller reads (and closes) the response."""
        connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        headers = {"Authorization": f"Bearer {self.token}"}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        connection.request(method, path, payload, headers)
        return connection.getresponse()

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        response = self.request(method, path, body)
        data = response.read()
        if response.status >= 300:
            raise RuntimeError(f"{method} {path}: {response.status} {data[:300]!r}")
        return json.loads(data)

    def start_task(self, command: list[str]) -> str:
        return self.call("POST", "/tasks", {"command": command[0], "args": command[1:]})["id"]

    def wait_ended(self, task_id: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.call("GET", f"/tasks/{task_id}")
            if record.get("finished_at") or record.get("state") not in ("queued", "running"):
                return record
            time.sleep(0.02)
        raise RuntimeError(f"task {task_id} did not end within {timeout} s")

    def stop(self) -> None:
        super().stop()
        if self._own_data is not None:
            self._own_data.cleanup()


def _skip_without_http(case: str, target: str):
    def decorate(measure):
        @functools.wraps(measure)
        def run(sizes) -> list[Row]:
            if not http_available():
                return [skipped(case, NOT_AVAILABLE, target)]
            return measure(sizes)
        return run
    return decorate


class RssSampler:
    """Samples the agent's resident set every few milliseconds in a thread."""

    def __init__(self, agent: Agent, interval: float = 0.02):
        self._agent, self._interval = agent, interval
        self.peak = agent.rss()[0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._agent.rss()[0])

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@_skip_without_http("endless output (HTTP, follower)", "< 50 MiB growth")
def endless_output(sizes) -> list[Row]:
    """A task printing GiBs with a follower reading it live: the agent must stay flat."""
    size = sizes.endless_mib * MIB
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    command = ["sh", "-c", f"yes {line.decode()} | head -c {size}"]
    with HttpAgent() as agent:
        client_probe = agent.call("GET", "/tasks?limit=1")  # warm the door before the idle figure
        del client_probe
        idle = agent.rss()[0]
        with RssSampler(agent) as sampler:
            started = time.perf_counter()
            task_id = agent.start_task(command)
            received = _follow_all(agent, task_id)
            seconds = time.perf_counter() - started
            agent.wait_ended(task_id)
    growth = sampler.peak - idle
    return [Row(f"endless output (HTTP, {sizes.endless_mib} MiB, follower)",
                f"{growth / MIB:.0f} MiB growth", f"idle {idle / MIB:.0f} MiB", "-",
                "< 50 MiB growth", growth < 50 * MIB,
                {"rss_growth_mib": growth / MIB, "idle_rss_mib": idle / MIB,
                 "followed_mib": received / MIB, "mib_per_s": received / MIB / seconds})]


def _follow_all(agent: HttpAgent, task_id: str) -> int:
    response = agent.request("GET", f"/tasks/{task_id}/output?follow=true", timeout=300)
    received = 0
    while True:
        data = response.read1(1 << 20)
        if not data:
            break
        received += len(data)
    response.close()
    return received


@_skip_without_http("follow latency (HTTP)", "p99 < 20 ms")
def follow_latency(sizes) -> list[Row]:
    """From the child writing a line (its own timestamp) to a follow=true client reading it."""
    n, pause = sizes.follow_lines, 0.01
    script = (f"import sys, time\ntime.sleep(0.5)\nfor _ in range({n}):\n"
              f"    sys.stdout.write(repr(time.time()) + '\\n'); sys.stdout.flush(); time.sleep({pause})\n")
    with HttpAgent() as agent:
        task_id = agent.start_task([sys.executable, "-c", script])
        response = agent.request("GET", f"/tasks/{task_id}/output?follow=true", timeout=60)
        latencies = []
        while True:
            line = response.readline()
            if not line:
                break
            latencies.append(time.time() - float(line))
        response.close()
    latencies = sorted(latencies[5:])  # the first lines may predate the follower's connection
    p50, p99 = (latencies[int(len(latencies) * q)] * 1000 for q in (0.5, 0.99))
    return [Row(f"follow latency (HTTP, {len(latencies)} lines)", f"p50 {p50:.2f} ms, p99 {p99:.2f} ms",
                "-", "-", "p99 < 20 ms", p99 < 20,
                {"p50_ms": p50, "p99_ms": p99, "lines": len(latencies)})]


@_skip_without_http("history (GET /tasks?limit=100)", "p50 < 20 ms")
def history(sizes) -> list[Row]:
    """GET /tasks?limit=100 with a large history in the store."""
    with tempfile.TemporaryDirectory(prefix="agent-data-") as data_dir:
        with HttpAgent(data_dir=data_dir) as agent:  # one real task: a row to copy
            agent.wait_ended(agent.start_task(["true"]))
        _seed_history(Path(data_dir), sizes.history_tasks)
        with HttpAgent(data_dir=data_dir) as agent:
            times, listed = [], 0
            for _ in range(sizes.history_requests):
                started = time.perf_counter()
                page = agent.call("GET", "/tasks?limit=100")
                times.append(time.perf_counter() - started)
                listed = len(page.get("tasks", page.get("items", [])))
    p50 = statistics.median(times) * 1000
    p99 = sorted(times)[int(len(times) * 0.99)] * 1000
    return [Row(f"history (GET /tasks?limit=100, {sizes.history_tasks} tasks)", f"p50 {p50:.2f} ms",
                f"p99 {p99:.2f} ms", "-", "p50 < 20 ms", p50 < 20,
                {"p50_ms": p50, "p99_ms": p99, "tasks_in_store": sizes.history_tasks,
                 "listed": listed})]


def _seed_history(data_dir: Path, count: int) -> None:
    """Copy the store's one task row until the history holds `count` tasks.

    Straight into SQLite, with the agent stopped: running 100,000 real tasks
    would take minutes. Only the table name and an "id" column are assumed;
    every other column is copied from the real row.
    """
    databases = [p for p in data_dir.rglob("*") if p.suffix in (".db", ".sqlite", ".sqlite3")]
    if len(databases) != 1:
        raise RuntimeError(f"expected one SQLite file in {data_dir}, found {databases}")
    with sqlite3.connect(databases[0]) as db:
        columns = [(name, pk) for _, name, _, _, _, pk in db.execute("PRAGMA table_info(tasks)")]
        copied = [name for name, pk in columns if not (pk and name != "id")]
        row = dict(zip(copied, db.execute(f"SELECT {', '.join(copied)} FROM tasks LIMIT 1").fetchone()))
        insert = f"INSERT INTO tasks ({', '.join(copied)}) VALUES ({', '.join('?' * len(copied))})"
        rows = ([uuid.uuid4().hex if name == "id" else row[name] for name in copied]
                for _ in range(count - 1))
        db.executemany(insert, rows)
    os.sync()
