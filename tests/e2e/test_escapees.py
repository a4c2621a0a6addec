"""A process that leaves its task's process group (setsid) still does not outlive the task."""
from __future__ import annotations

import signal
import time

from agent.runner.procinfo import proc_stat
from tests.procs import processes_where

QUIET = ">/dev/null 2>&1 </dev/null"
"""An escapee that kept the task's stdout would hold its result open."""


def _escape(pid_file) -> str:
    """Shell that starts a sleeper in a session of its own, which writes its pid
    once it is there (before that, it is still in the task's group)."""
    return f"setsid sh -c 'echo $$ > {pid_file}; exec sleep 300' {QUIET} & "


def _wait_for(pid_file) -> str:
    return f"while [ ! -s {pid_file} ]; do sleep 0.01; done; "


def _alive(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and not stat.zombie


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _read_pid(path, seconds: float = 10.0) -> int:
    deadline = time.monotonic() + seconds
    while not (path.exists() and path.read_text().strip()):
        assert time.monotonic() < deadline, f"the task never wrote {path}"
        time.sleep(0.05)
    return int(path.read_text())


def test_a_setsid_process_is_killed_and_reaped_once_its_task_has_ended(start_agent, tmp_path):
    agent = start_agent()
    client = agent.connect()
    pid_file = tmp_path / "escapee.pid"
    client.send({"command": ["sh", "-c", _escape(pid_file) + _wait_for(pid_file) + f"cat {pid_file}"]})
    escapee = int(client.receive()["output"])
    assert proc_stat(escapee).session == escapee, "it left the task's session and group"
    assert _gone_within(escapee, 10), "the escaped sleeper outlived its task"
    deadline = time.monotonic() + 5
    while escapee in processes_where(1, agent.proc.pid, include_zombies=True):
        assert time.monotonic() < deadline, "the agent never reaped it: a zombie"
        time.sleep(0.05)
    agent.wait_for_log(f"process {escapee} left its task's process group and outlived its task")


def test_a_daemon_is_left_alone_while_its_task_runs(start_agent, tmp_path):
    """A double fork: the daemon's parent exits at once, so the agent adopts it
    while the task that started it still runs (and may still need it)."""
    agent = start_agent()
    client = agent.connect()
    pid_file = tmp_path / "daemon.pid"
    starter = tmp_path / "start-daemon.sh"  # exits at once, leaving the daemon an orphan
    starter.write_text(_escape(pid_file) + "\n")
    release = tmp_path / "release"  # the task runs until the test has looked
    client.send({"command": ["sh", "-c", f"sh {starter}; while [ ! -e {release} ]; do sleep 0.05; "
                                         "done; echo done"]})
    daemon = _read_pid(pid_file)
    time.sleep(2.5)  # at least two looks at the agent's children
    assert _alive(daemon), "killed while its task still ran"
    assert proc_stat(daemon).ppid == agent.proc.pid, "the agent adopted it (child subreaper)"
    release.touch()
    assert client.receive()["output"] == "done\n"
    assert _gone_within(daemon, 10), "the daemon outlived its task"


def test_stopping_the_agent_kills_what_its_running_tasks_left(start_agent, tmp_path):
    agent = start_agent("--shutdown-grace", "0.5")
    client = agent.connect()
    pid_file = tmp_path / "daemon.pid"
    client.send({"command": ["sh", "-c", _escape(pid_file) + _wait_for(pid_file) + "exec sleep 300"]})
    daemon = _read_pid(pid_file)
    assert agent.stop(signal.SIGTERM) == 0
    assert _gone_within(daemon, 5), "the daemon outlived the agent"
    assert "(the agent is stopping): killed it" in agent.log
