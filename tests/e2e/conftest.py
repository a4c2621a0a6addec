"""A real `twistd -n agent` in a subprocess, found by the ports it logs."""
from __future__ import annotations

import functools
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.runner.procinfo import proc_stat
from tests.procs import session_members, wait_until_empty

REPO = Path(__file__).resolve().parents[2]
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
LISTENING = re.compile(r"(?P<what>[\w ]+?) listening on (?P<host>[\d.]+):(?P<port>\d+)")
WATCHDOG_STARTED = re.compile(r"watchdog (?P<pid>\d+) started")


class AgentProcess:
    """One agent process; its own session, so a test can prove nothing outlived it."""

    def __init__(self, args, cwd, doors=("TCP task protocol",), startup_timeout=15.0,
                 nofile: int | None = None, one_cpu: bool = False, env=None,
                 twistd=None, base_env=None):
        """twistd, base_env: the command and the whole environment (default: TWISTD,
        looked up now so a test may patch it, with the checkout on PYTHONPATH);
        env adds to base_env."""
        if twistd is None:
            twistd = TWISTD
        if base_env is None:
            base_env = dict(os.environ, PYTHONPATH=str(REPO))
        env = dict(base_env, **(env or {}))
        self.proc = subprocess.Popen(
            [*twistd, "-n", "--pidfile=", "agent", *args], cwd=cwd, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=functools.partial(_as_from_a_shell, nofile, one_cpu))
        self.log_lines: list[str] = []
        self.ports: dict[str, int] = {}
        self._changed = threading.Condition()
        threading.Thread(target=self._read_log, daemon=True).start()
        self._wait_for(lambda: all(d in self.ports for d in doors), startup_timeout,
                       f"agent did not report listening for {doors}")

    def _read_log(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._changed:
                self.log_lines.append(line)
                match = LISTENING.search(line)
                if match:
                    self.ports[match["what"].strip()] = int(match["port"])
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _wait_for(self, predicate, timeout, message):
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                if self.proc.poll() is not None and not predicate():
                    raise AssertionError(f"{message}; agent exited:\n" + self.log)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{message}:\n" + self.log)
                self._changed.wait(min(left, 0.1))

    def wait_for_log(self, text: str, timeout: float = 10.0, count: int = 1):
        """Until `count` lines of the log contain text."""
        self._wait_for(lambda: sum(text in line for line in self.log_lines) >= count, timeout,
                       f"log never said {text!r} {count} time(s)")

    @property
    def log(self) -> str:
        return "\n".join(self.log_lines)

    @property
    def tcp_port(self) -> int:
        return self.ports["TCP task protocol"]

    def connect(self, timeout: float = 30.0) -> "LineClient":
        return LineClient(socket.create_connection(("127.0.0.1", self.tcp_port), timeout=timeout))

    def stop(self, sig=signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_everything()
            raise AssertionError("agent did not exit after " + signal.Signals(sig).name)

    def kill_everything(self):
        """Teardown of last resort: the agent's whole session, task groups included,
        and its watchdogs."""
        running = [pid for pid in self.watchdogs if watchdog_running(pid)]
        for pid in session_members(self.proc.pid) + running:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(5)

    def survivors(self, timeout: float = 5.0) -> list[int]:
        return wait_until_empty(session_members, self.proc.pid, timeout)

    @property
    def watchdogs(self) -> list[int]:
        """The pid of every watchdog the agent has started, oldest first (its own session,
        so survivors() cannot see it)."""
        with self._changed:
            return [int(m["pid"]) for line in self.log_lines
                    for m in [WATCHDOG_STARTED.search(line)] if m]

    def wait_for_watchdog(self, count: int = 1, timeout: float = 10.0) -> int:
        """The pid of the agent's count-th watchdog, once the log says it started."""
        self._wait_for(lambda: len(self.watchdogs) >= count, timeout,
                       f"the agent never started watchdog number {count}")
        return self.watchdogs[count - 1]

    def watchdog_survivors(self, timeout: float = 5.0) -> list[int]:
        """The agent's watchdogs still running once timeout has passed (zombies are gone)."""
        return wait_until_empty(lambda _: [pid for pid in self.watchdogs if watchdog_running(pid)],
                                0, timeout)

    def kill_9_with_its_watchdog(self) -> None:
        """kill -9 of the agent and of its watchdog, as an OOM killer might: nothing is
        left to kill the task groups until the next start. The agent is stopped first,
        so it cannot start another watchdog in between."""
        self.proc.send_signal(signal.SIGSTOP)
        for pid in self.watchdogs:
            if watchdog_running(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def finish(self) -> None:
        """A test's teardown: stop the agent if it still runs, and prove nothing outlived it."""
        if self.proc.poll() is None:
            self.stop()
        leftovers = self.survivors() + self.watchdog_survivors()
        if leftovers:
            self.kill_everything()
        assert not leftovers, f"processes outlived the agent: {leftovers}"


def watchdog_running(pid: int) -> bool:
    """Whether pid is a live watchdog program (not a zombie, not a reused pid)."""
    stat = proc_stat(pid)
    if stat is None or stat.zombie:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"agent.runner.watchdog_main" in f.read()
    except OSError:
        return False


def _as_from_a_shell(nofile: int | None, one_cpu: bool = False):
    """As from a terminal: a background CI job would hand the agent SIGINT ignored.
    nofile: the soft open-file limit the agent starts with (as `ulimit -Sn`).
    one_cpu: pin the agent (and so its tasks) to one CPU, as on a busy machine,
    where a child runs before the agent gets the CPU back."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if one_cpu:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    if nofile is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


class LineClient:
    """A blocking newline-JSON client, as a scheduler would be."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.reader = sock.makefile("rb")

    def send(self, *requests) -> None:
        data = b"".join(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n"
                        for r in requests)
        self.sock.sendall(data)

    def receive(self) -> dict:
        line = self.reader.readline()
        if not line:
            raise EOFError("agent closed the connection")
        return json.loads(line)

    def receive_many(self, n: int) -> list[dict]:
        return [self.receive() for _ in range(n)]

    def half_close(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


@pytest.fixture
def start_agent(tmp_path):
    """start_agent(*args) -> AgentProcess; each is stopped and checked for survivors."""
    agents: list[AgentProcess] = []

    def start(*args, cwd=None, doors=("TCP task protocol",), nofile=None, one_cpu=False,
              env=None, twistd=None, base_env=None, startup_timeout=15.0):
        agent = AgentProcess(["--listen", "tcp:0:interface=127.0.0.1", *args],
                             cwd or tmp_path, doors, startup_timeout, nofile=nofile,
                             one_cpu=one_cpu, env=env, twistd=twistd, base_env=base_env)
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.finish()
