"""Fault injection on a real agent: kill -9 with a mixed load of HTTP and TCP tasks.

The agent's watchdog dies with it here, so the restart's recovery is what
ends the groups (tests/e2e/test_watchdog.py: the watchdog alone)."""
from __future__ import annotations

import sqlite3
import time

from tests.e2e.test_http_agent import data_dir, start_http_agent  # noqa: F401 (fixtures)
from tests.procs import group_members, processes_where, wait_until_empty

SHELLS = [
    ["-c", "echo a; sleep 300 & sleep 300 & wait"],   # two grandchildren
    ["-c", "echo b; (sleep 300 &); sleep 300"],        # an orphaned grandchild, same group
    ["-c", "echo c; sleep 300"],
    ["-c", "trap '' TERM; echo d; sleep 300"],         # ignores SIGTERM
    ["-c", "echo e; exec sleep 300"],
]


def _task_groups(agent_pid: int, expected: int, timeout: float = 10.0) -> set[int]:
    """Process groups of the agent's sleeping tasks once `expected` of them are running.

    Only children running "sleep 300" count: a finished task's child (printf, echo)
    may linger for a moment before it is reaped and must not be taken for one."""
    deadline = time.monotonic() + timeout
    while True:
        groups = {_group_of(p) for p in processes_where(3, agent_pid)
                  if p != agent_pid and _sleeps_300(_cmdline(p))}
        groups.discard(None)
        if len(groups) >= expected or time.monotonic() > deadline:
            return groups
        time.sleep(0.05)


def _sleeps_300(cmdline: bytes) -> bool:
    return b"sleep 300" in cmdline or b"sleep\x00300" in cmdline


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _group_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[2])
    except OSError:
        return None


def test_kill_9_with_http_and_tcp_tasks_running(start_http_agent, data_dir):  # noqa: F811
    agent, api = start_http_agent("--parallel", "0")
    finished = api.json("POST", "/tasks", {"command": "printf", "args": ["kept\\n"]}, expect=201)
    api.wait_for(finished["id"], "succeeded")
    tcp_finished = agent.connect()
    tcp_finished.send({"command": ["echo", "tcp done"], "id": "before"})
    assert tcp_finished.receive()["output"] == "tcp done\n"

    running = [api.json("POST", "/tasks", {"command": "sh", "args": args}, expect=201)
               for args in SHELLS]
    tcp = agent.connect()
    tcp.send({"command": ["sh", "-c", "sleep 300 & sleep 300"], "id": "tcp-running"})
    groups = _task_groups(agent.proc.pid, expected=6)
    assert len(groups) == 6
    for task in running:
        api.wait_for(task["id"], "running")

    agent.kill_9_with_its_watchdog()  # the watchdog would kill them: the restart is tested here
    assert all(group_members(g) for g in groups), "with no watchdog, the tasks outlive the agent"

    agent, api = start_http_agent("--parallel", "0")
    survivors = {g: wait_until_empty(group_members, g) for g in groups}
    assert not any(survivors.values()), f"processes survived the restart: {survivors}"

    for task in running:
        record = api.json("GET", f"/tasks/{task['id']}")
        assert (record["state"], record["exit_code"]) == ("lost", -1)
    tcp_records = api.json("GET", "/tasks?limit=100")["tasks"]
    by_argv = {tuple(t["command"]): t for t in tcp_records if t["source"] == "tcp"}
    assert by_argv[("echo", "tcp done")]["state"] == "succeeded"
    assert by_argv[("sh", "-c", "sleep 300 & sleep 300")]["state"] == "lost"
    assert api.request("GET", f"/tasks/{finished['id']}/output")[1] == b"kept\n"

    agent.stop()
    with sqlite3.connect(data_dir / "history.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
