"""`python -m bench.fleet` (make bench-fleet): the fleet on a private PostgreSQL.

- throughput: N x /bin/true through 5 fleet agents, submitted and awaited by
  `agent-scheduler --fleet`, against the same batch through `agent-scheduler --agent` x5
  to the same five agents' TCP doors, in the same run;
- latency: submit-to-start on an idle fleet (one task at a time; the database's own
  timestamps: queued at submit, running at claim), p50 and p99;
- cancel: cancel by key of a running task to its record saying cancelled;
- redelivery: kill -9 of the agent running a task, to the task running on another node
  (default lease, 10 s).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from agent.fleet import schema, tasks
from agent.fleet.records import Submission
from bench.agentproc import Agent
from tests.postgres import PostgresServer

SCHEDULER = [sys.executable, "-m", "agent.clients.scheduler"]


def start_agents(dsn: str, n: int, *extra: str) -> list[Agent]:
    agents = [Agent("--fleet", dsn, "--node-id", f"bench{i}", "--log-tasks", "none", *extra)
              for i in range(n)]
    for agent in agents:
        deadline = time.monotonic() + 20
        while "joined the fleet" not in agent.log():
            if time.monotonic() > deadline:
                raise RuntimeError("agent did not join the fleet:\n" + agent.log())
            time.sleep(0.02)
    return agents


def until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)
    return value


def scheduler(args: list[str], batch: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run([*SCHEDULER, *args, str(batch)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"agent-scheduler {' '.join(args[:2])} failed: {done.stderr[-2000:]}")
    return elapsed


def throughput(dsn: str, agents: list[Agent], count: int, work: Path) -> dict:
    fleet_batch = work / "fleet.jsonl"
    direct_batch = work / "direct.jsonl"
    run_id = int(time.time() * 1000)
    fleet_batch.write_text("".join(json.dumps({"id": f"tp{run_id}-{i}", "command": ["/bin/true"]})
                                   + "\n" for i in range(count)))
    direct_batch.write_text((json.dumps({"command": ["/bin/true"]}) + "\n") * count)
    direct_args = [arg for agent in agents for arg in ("--agent", f"127.0.0.1:{agent.tcp_port}")]
    figures = {}
    for name, args, batch in (("direct", direct_args, direct_batch),
                              ("fleet", ["--fleet", dsn], fleet_batch),):
        elapsed = scheduler(args, batch)
        figures[name] = {"seconds": round(elapsed, 2), "tasks_per_s": round(count / elapsed, 1)}
    figures["fleet_vs_direct"] = round(figures["fleet"]["tasks_per_s"]
                                       / figures["direct"]["tasks_per_s"], 2)
    return figures


def latency(conn, samples: int) -> dict:
    waits = []
    for i in range(samples):
        key = f"lat{time.time_ns()}-{i}"
        tasks.submit(conn, Submission(key, ("/bin/true",)), "bench")
        until(lambda: tasks.get(conn, key).state == "finished", 30, key)
        task = tasks.get(conn, key)
        waits.append((task.started_at - task.submitted_at).total_seconds() * 1000)
        time.sleep(0.05)  # idle between tasks: each one wakes a sleeping fleet
    waits.sort()
    return {"samples": samples, "p50_ms": round(statistics.median(waits), 2),
            "p99_ms": round(waits[min(len(waits) - 1, int(len(waits) * 0.99))], 2),
            "max_ms": round(waits[-1], 2)}


def cancel_latency(conn, samples: int = 20) -> dict:
    """Cancel by key of a running task, to its record saying cancelled (its node ended it)."""
    waits = []
    for i in range(samples):
        key = f"cancel{time.time_ns()}-{i}"
        tasks.submit(conn, Submission(key, ("sleep", "60")), "bench")
        until(lambda: tasks.get(conn, key).state == "running", 30, key)
        asked = time.perf_counter()
        tasks.cancel(conn, key)
        until(lambda: tasks.get(conn, key).state == "cancelled", 30, f"{key} cancelled")
        waits.append((time.perf_counter() - asked) * 1000)
    waits.sort()
    return {"samples": samples, "p50_ms": round(statistics.median(waits), 1),
            "max_ms": round(waits[-1], 1)}


def redelivery(conn, agents: list[Agent], lease: float) -> dict:
    key = f"redeliver{time.time_ns()}"
    tasks.submit(conn, Submission(key, ("sleep", "60")), "bench")
    running = until(lambda: (t := tasks.get(conn, key)).state == "running" and t, 30, key)
    victim = next(a for a in agents if f"bench{agents.index(a)}" == running.node_id)
    killed_at = time.time()
    os.kill(victim.pid, signal.SIGKILL)
    again = until(lambda: (t := tasks.get(conn, key)).attempt == 2 and t.state == "running"
                  and t, 60, "the task to run again")
    tasks.cancel(conn, key)
    return {"lease_s": lease, "kill_to_running_elsewhere_s":
            round(again.started_at.timestamp() - killed_at, 2), "node": again.node_id}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--agents", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--latency-samples", type=int, default=200)
    parser.add_argument("--cancel-samples", type=int, default=20)
    parser.add_argument("--lease", type=float, default=10.0, help="the agents' --fleet-lease")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="agent-bench-fleet-") as work, \
            PostgresServer(Path(tempfile.mkdtemp(prefix="agent-bench-pg-"))) as server:
        dsn = server.create_database("bench")
        with psycopg.connect(dsn, autocommit=True) as conn:
            schema.migrate(conn)
            agents = start_agents(dsn, options.agents, "--parallel", str(options.parallel),
                                  "--fleet-lease", str(options.lease))
            try:
                results = {
                    "throughput": throughput(dsn, agents, options.tasks, Path(work)),
                    "latency": latency(conn, options.latency_samples),
                    "cancel": cancel_latency(conn, options.cancel_samples),
                    "redelivery": redelivery(conn, agents, options.lease),
                }
            finally:
                for agent in agents:
                    agent.stop()
    print(json.dumps({"agents": options.agents, "parallel": options.parallel,
                      "tasks": options.tasks, **results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
