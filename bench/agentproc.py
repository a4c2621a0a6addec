"""A real `twistd -n agent` in a subprocess, found by the port it logs.

The same approach as tests/e2e/conftest.py, with one difference that matters
for measuring: the agent logs to a file, not to a pipe this process must
drain, so the benchmark client never shares its CPU with a log reader.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AGENT_REPO_VARIABLE = "BENCH_AGENT_REPO"
"""Set to another checkout to benchmark its agent with this suite (python -m bench --agent-repo)."""
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
LISTENING = re.compile(r"(?P<what>[\w ]+?) listening on (?P<host>[\d.]+):(?P<port>\d+)")
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def agent_repo() -> Path:
    """The checkout whose agent is measured: this one unless BENCH_AGENT_REPO says otherwise."""
    return Path(os.environ.get(AGENT_REPO_VARIABLE) or REPO)


class Agent:
    """One agent process with its own log file and (optionally) data directory."""

    def __init__(self, *args: str, doors=("TCP task protocol",), timeout: float = 20.0):
        self.dir = tempfile.TemporaryDirectory(prefix="agent-bench-")
        self.log_path = Path(self.dir.name) / "agent.log"
        env = dict(os.environ, PYTHONPATH=str(agent_repo()))
        argv = [*TWISTD, "-n", "--pidfile=", f"--logfile={self.log_path}", "agent",
                "--listen", "tcp:0:interface=127.0.0.1", *args]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(argv, cwd=self.dir.name, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.ports: dict[str, int] = {}
        self.listening_after = self._wait_for_doors(doors, timeout)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def tcp_port(self) -> int:
        return self.ports["TCP task protocol"]

    @property
    def http_port(self) -> int:
        return self.ports["HTTP API"]

    def _wait_for_doors(self, doors, timeout: float) -> float:
        """Poll the log until every door says where it listens; return seconds since launch."""
        deadline = self.started + timeout
        while True:
            text = self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""
            for match in LISTENING.finditer(text):
                self.ports[match["what"].strip()] = int(match["port"])
            if all(door in self.ports for door in doors):
                return time.perf_counter() - self.started
            if self.proc.poll() is not None or time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"agent did not start listening on {doors}:\n{text}")
            time.sleep(0.002)

    def rss(self) -> tuple[int, int]:
        """(current, peak) resident set size of the agent process in bytes."""
        fields = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0]) * 1024
        return fields["VmRSS"], fields["VmHWM"]

    def cpu_seconds(self) -> float:
        """User + system CPU the agent process itself has used (children excluded)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def stop(self) -> None:
        """SIGTERM (the agent kills its task groups and exits 0), SIGKILL the session if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.dir.cleanup()

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def agent_help() -> str:
    """`twistd agent --help`, to find out which doors this checkout has."""
    env = dict(os.environ, PYTHONPATH=str(agent_repo()))
    done = subprocess.run([*TWISTD, "agent", "--help"], env=env, cwd=agent_repo(),
                          capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr
