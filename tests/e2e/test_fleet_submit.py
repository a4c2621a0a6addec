"""The real `agent-scheduler --fleet` command and a real `twistd -n agent --fleet` agent on
the suite's PostgreSQL: the batch goes through the queue, the agent runs it, the results
come back worded as the TCP door's, saying where each task ran."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.e2e.conftest import REPO


def test_a_real_agent_runs_the_batch_agent_scheduler_fleet_submits(start_agent, fleet_dsn,
                                                                   tmp_path):
    agent = start_agent("--fleet", fleet_dsn, "--node-id", "e2e-node", "--parallel", "2",
                        "--data-dir", str(tmp_path / "data"))
    agent.wait_for_log("joined the fleet", timeout=30)
    batch = tmp_path / "batch.json"
    batch.write_text("\n".join(json.dumps(r) for r in [
        {"id": "hello", "command": ["echo", "hello"]},
        {"id": "three", "command": ["sh", "-c", "echo out; exit 3"]},
        {"id": "slow", "command": ["sleep", "30"], "timeout": 300},
    ]) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "agent.clients.scheduler", "--fleet", fleet_dsn,
         "--timeout-unit", "ms", str(batch)],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr + agent.log
    results = {r["id"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert set(results) == {"hello", "three", "slow"}
    hello, three, slow = results["hello"], results["three"], results["slow"]
    assert (hello["output"], hello["exit_code"], hello["error"]) == ("hello\n", 0, "")
    assert (three["output"], three["exit_code"]) == ("out\n", 3)
    assert (slow["exit_code"], slow["error"]) == (-1, "timeout exceeded")
    for result in results.values():
        assert (result["node_id"], result["state"], result["attempt"]) == ("e2e-node",
                                                                         "finished", 1)
        assert len(result["local_task_id"]) == 32  # its id there: GET /tasks/{id}/output
        assert result["executed_at"] > 0 and result["duration_ms"] >= 0
    assert done.stderr.startswith("agent-scheduler: 3 sent, 1 ok, 1 failed, 1 timed out, "
                                  "0 busy, 0 without result")
