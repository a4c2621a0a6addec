"""A real agent's watchdog: kill -9 of the agent takes its task groups with it, grandchildren
included; a clean stop still gives the tasks their grace; a killed watchdog is replaced."""
from __future__ import annotations

import os
import signal
import time

from tests.e2e.conftest import watchdog_running
from tests.procs import group_members, wait_until_empty

GRANDCHILDREN = "sleep 300 & sleep 300 & wait"


def _start_sleeping_task(agent, tmp_path, name: str = "task") -> int:
    """A shell with two sleeping children, through the TCP door; its process group."""
    pid_file = tmp_path / f"{name}.pid"
    client = agent.connect()
    client.send({"command": ["sh", "-c", f"echo $$ > {pid_file}; {GRANDCHILDREN}"]})
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.02)
    pgid = int(pid_file.read_text())
    assert not wait_until_empty(lambda g: [] if len(group_members(g)) == 3 else [g], pgid, 10), \
        "the shell never started its two children"
    agent.client = client  # kept open: a closed connection would end the task
    return pgid


def test_kill_9_of_the_agent_kills_its_task_group_grandchildren_included(start_agent, tmp_path):
    agent = start_agent()
    watchdog = agent.wait_for_watchdog()
    pgid = _start_sleeping_task(agent, tmp_path)
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(10)
    assert not wait_until_empty(group_members, pgid, 5), "the task's group outlived the agent"
    assert not agent.watchdog_survivors(5), "the watchdog exits once it has killed them"
    assert not watchdog_running(watchdog)


def test_a_clean_stop_still_gives_the_task_its_grace_and_the_watchdog_exits(start_agent,
                                                                            tmp_path):
    """SIGTERM to the agent's whole process group (a terminal's Ctrl-C does as much) and to
    the watchdog itself (systemd's KillMode=control-group would): the watchdog kills
    nothing early, so the task's SIGTERM handler has its time, and it exits after the agent."""
    agent = start_agent("--shutdown-grace", "10")
    watchdog = agent.wait_for_watchdog()
    done = tmp_path / "cleaned-up"
    client = agent.connect()
    client.send({"command": ["sh", "-c", f"trap 'sleep 0.5; echo graceful > {done}; exit 0' TERM; "
                                         f"echo $$ > {tmp_path}/task.pid; sleep 300 & wait"]})
    pid_file = tmp_path / "task.pid"
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text().strip()):
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.02)
    os.kill(watchdog, signal.SIGTERM)
    os.killpg(agent.proc.pid, signal.SIGTERM)
    assert agent.proc.wait(15) == 0
    assert done.read_text() == "graceful\n", "the task's group was killed before its grace ended"
    assert not agent.watchdog_survivors(5)
    assert len(agent.watchdogs) == 1, "the first watchdog lived to the end"
    assert "starting another" not in agent.log


def test_a_killed_watchdog_is_replaced_and_the_new_one_still_protects(start_agent, tmp_path):
    agent = start_agent()
    first = agent.wait_for_watchdog()
    pgid = _start_sleeping_task(agent, tmp_path)
    os.kill(first, signal.SIGKILL)
    second = agent.wait_for_watchdog(2)
    assert second != first and watchdog_running(second)
    agent.wait_for_log(f"watchdog {first} ended")
    assert len(group_members(pgid)) == 3, "losing the watchdog costs the task nothing"
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(10)
    assert not wait_until_empty(group_members, pgid, 5), "the new watchdog did not know the group"
    assert not agent.watchdog_survivors(5)
