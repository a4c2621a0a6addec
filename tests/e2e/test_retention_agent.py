"""Retention in a real `twistd -n agent`: the prune at start, and prunes around a running task."""
from __future__ import annotations

import sys
import time

from tests.e2e import conftest
from tests.e2e.test_http_agent import data_dir, start_http_agent  # noqa: F401 (fixtures)

TASK_OUTPUT = 100_000


def _data_dir_bytes(data_dir) -> int:
    """What --keep-bytes counts: the database files and every output file."""
    files = [p for p in data_dir.glob("history.sqlite3*")] + list(data_dir.glob("output/*/*"))
    return sum(p.stat().st_size for p in files)


def _gone(api, task_id: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while api.request("GET", f"/tasks/{task_id}")[0].status != 404:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_restart_with_a_small_keep_bytes_prunes_the_oldest_tasks_and_their_output(
        start_http_agent, data_dir):  # noqa: F811
    agent, api = start_http_agent()
    ids = []
    for _ in range(6):
        task = api.json("POST", "/tasks", {"command": "head", "args": [
            "-c", str(TASK_OUTPUT), "/dev/zero"]}, expect=201)
        ids.append(api.wait_for(task["id"], "succeeded")["id"])
    assert agent.stop() == 0
    assert "pruned" not in agent.log, "30 days and 4 GiB: nothing to prune"
    database = _data_dir_bytes(data_dir) - 6 * TASK_OUTPUT
    limit = database + int(2.5 * TASK_OUTPUT)

    agent, api = start_http_agent("--keep-bytes", str(limit))
    agent.wait_for_log("pruned")
    kept = [i for i in ids if api.request("GET", f"/tasks/{i}")[0].status == 200]
    assert 1 <= len(kept) <= 2 and kept == ids[-len(kept):], "the oldest go first"
    assert [(data_dir / "output" / i).exists() for i in ids] == [i in kept for i in ids]
    assert api.request("GET", f"/tasks/{ids[0]}/output")[0].status == 404
    assert _data_dir_bytes(data_dir) <= limit
    assert f"by size (0 older than --keep-days, {6 - len(kept)} over --keep-bytes)" in agent.log


def test_a_running_task_survives_every_prune(start_http_agent, data_dir, monkeypatch):  # noqa: F811
    """Prunes every 0.2 s (the module constant, set before twistd runs) with a 100-byte limit:
    the database alone is over it, but the running task's 8 bytes of output are not (at 1
    byte they would be, and new HTTP tasks would be refused with 507)."""
    monkeypatch.setattr(conftest, "TWISTD", [
        sys.executable, "-c", "import agent.history.retention as r; r.PRUNE_INTERVAL = 0.2; "
                              "from twisted.scripts.twistd import run; run()"])
    agent, api = start_http_agent("--keep-bytes", "100")
    running = api.json("POST", "/tasks", {"command": "sh", "args": [
        "-c", "echo started; exec sleep 300"]}, expect=201)
    short = api.json("POST", "/tasks", {"command": "echo", "args": ["short"]}, expect=201)
    assert _gone(api, short["id"]), "an ended task goes at the next prune"
    agent.wait_for_log("pruned 1 task(s)")
    time.sleep(1.0)  # five more prunes, in real time: that is what this test is about

    record = api.json("GET", f"/tasks/{running['id']}")
    assert (record["state"], record["stdout_bytes"]) == ("running", len(b"started\n"))
    assert api.request("GET", f"/tasks/{running['id']}/output")[1] == b"started\n"
    assert (data_dir / "output" / running["id"]).is_dir()
    assert agent.log.count("nothing more may be pruned") == 1, "an unmeetable limit: said once"
    api.json("DELETE", f"/tasks/{running['id']}?purge=true", expect=409)
    assert api.json("DELETE", f"/tasks/{running['id']}")["state"] == "cancelled"
    api.json("DELETE", f"/tasks/{running['id']}?purge=true")
    assert not (data_dir / "output" / running["id"]).exists()
