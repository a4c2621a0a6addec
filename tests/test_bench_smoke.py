"""The benchmark suite runs: CI checks that it prints its table and writes JSON, not the figures."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.e2e.conftest import REPO


def test_quick_bench_prints_a_table_and_writes_json(tmp_path):
    results = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "serial,startup,history",
         "--json", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    table = [line for line in done.stdout.splitlines() if line.startswith("|")]
    assert table[0].split("|")[1].strip() == "case"
    assert any("serial round trip" in line for line in table)
    assert any("start-up" in line for line in table)
    document = json.loads(results.read_text())
    assert document["quick"] is True
    assert {row["case"].split(" (")[0] for row in document["rows"]} >= {"serial round trip",
                                                                         "start-up"}
    assert all(row["result"] in ("pass", "FAIL", "skipped") for row in document["rows"])
    assert document["machine"]["cores"] >= 1


def test_the_leanest_agent_floor_prints_its_ratios():
    done = subprocess.run([sys.executable, "-m", "bench.leanest", "--rounds", "1", "--tasks", "40"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("leanest Python agent: serial ") and "x); parallel " in done.stdout


def test_the_cpu_budget_prints_each_share_and_what_the_target_leaves_the_agent():
    done = subprocess.run([sys.executable, "-m", "bench.budget", "--rounds", "1", "--tasks", "200",
                           "--seconds", "0.2"], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr
    for row in ("| spawn loop x2 (the baseline) |", "| leanest Python agent |", "| this agent |"):
        assert row in done.stdout
    assert "which leaves the agent" in done.stdout


def test_the_fleet_bench_runs_and_prints_its_figures(postgres_server):
    """make bench-fleet, tiny: it needs PostgreSQL's binaries, as the fleet's tests do."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.fleet", "--tasks", "40", "--agents", "2",
         "--latency-samples", "3", "--cancel-samples", "2", "--lease", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["throughput"]["fleet"]["tasks_per_s"] > 0
    assert figures["throughput"]["direct"]["tasks_per_s"] > 0
    assert figures["latency"]["samples"] == 3 and figures["cancel"]["samples"] == 2
    assert 0 < figures["redelivery"]["kill_to_running_elsewhere_s"] < 30
