"""agentctl, the installed script, against a real `twistd -n agent`: streams, exit statuses,
Ctrl-C, a follow that survives a dropped connection, and one-line errors."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, AgentProcess

DOORS = ("TCP task protocol", "HTTP API")
SCRIPT = Path(sys.executable).with_name("agentctl")
AGENTCTL = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "agent.clients.ctl"]

SLOW_BOTH_EXIT_3 = """
import sys, time
for i in range(4):
    print(f"out {i}", flush=True)
    print(f"err {i}", file=sys.stderr, flush=True)
    time.sleep(0.1)
sys.exit(3)
"""


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    """One agent for the module: each test runs its own tasks, none changes the agent."""
    home = tmp_path_factory.mktemp("agentctl")
    agent = AgentProcess(["--listen", "tcp:0:interface=127.0.0.1",
                          "--http", "tcp:0:interface=127.0.0.1", "--data-dir", str(home / "data")],
                         home, DOORS)
    agent.home = home
    agent.url = f"http://127.0.0.1:{agent.ports['HTTP API']}"
    agent.token_file = home / "data" / "token"
    yield agent
    agent.finish()


def ctl_env(agent, url=None, token_file=None) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), AGENT_URL=url or agent.url,
                AGENT_TOKEN_FILE=str(token_file or agent.token_file))


def agentctl(agent, *args, url=None, token_file=None, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run([*AGENTCTL, *args], capture_output=True, timeout=timeout,
                          cwd=agent.home, env=ctl_env(agent, url, token_file))


def spawn_agentctl(agent, *args, url=None) -> subprocess.Popen:
    """As from a shell's foreground: SIGINT not ignored, whatever pytest's parent did.
    Unbuffered, so a line read before communicate() leaves nothing behind in a buffer."""
    return subprocess.Popen([*AGENTCTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            bufsize=0, cwd=agent.home, env=ctl_env(agent, url),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def record(agent, task_id: str) -> dict:
    shown = agentctl(agent, "show", "--json", task_id)
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


def newest_task(agent) -> dict:
    return json.loads(agentctl(agent, "tasks", "--limit", "1", "--json").stdout)[0]


def one_line_error(result: subprocess.CompletedProcess) -> str:
    err = result.stderr.decode()
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("agentctl: "), err
    return err


def test_run_streams_each_stream_to_its_own_and_exits_with_the_tasks_status(agent):
    result = agentctl(agent, "run", "--", sys.executable, "-c", SLOW_BOTH_EXIT_3)
    assert result.returncode == 3, result.stderr
    assert result.stdout == b"out 0\nout 1\nout 2\nout 3\n"
    assert result.stderr == b"err 0\nerr 1\nerr 2\nerr 3\n"


def test_run_shows_output_while_the_task_still_runs(agent):
    proc = spawn_agentctl(agent, "run", "--", "sh", "-c", "echo first; sleep 1.5; echo second")
    try:
        assert proc.stdout.readline() == b"first\n"
        assert newest_task(agent)["state"] == "running"
        assert proc.stdout.read() == b"second\n"
        assert proc.wait(15) == 0
    finally:
        proc.kill()
        proc.wait()


def test_run_passes_the_environment_and_exits_124_on_a_timeout(agent):
    result = agentctl(agent, "run", "--timeout", "0.5", "--env", "WHO=ctl", "--",
                      "sh", "-c", "echo $WHO; sleep 10")
    assert (result.returncode, result.stdout) == (124, b"ctl\n")
    assert one_line_error(result).endswith(": timeout exceeded\n")


def test_run_of_a_missing_program_exits_127_saying_why(agent):
    result = agentctl(agent, "run", "--", "no-such-program-here")
    assert result.returncode == 127
    assert "cannot start 'no-such-program-here': No such file or directory" in \
        one_line_error(result)


def test_ctrl_c_cancels_the_task_and_exits_130(agent):
    proc = spawn_agentctl(agent, "run", "--", "sh", "-c", "echo started; exec sleep 60")
    try:
        assert proc.stdout.readline() == b"started\n"
        task = newest_task(agent)
        assert task["state"] == "running"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 130
    finally:
        proc.kill()
        proc.wait()
    assert "cancelled (SIGINT)" in proc.stderr.read().decode()
    ended = record(agent, task["id"])
    assert (ended["state"], ended["reason"], ended["cleanup"]) == \
        ("cancelled", "cancelled", "complete")


def test_a_reader_that_leaves_cancels_the_task_as_sigpipe_would(agent):
    proc = spawn_agentctl(agent, "run", "--", "yes")
    try:
        assert proc.stdout.readline() == b"y\n"
        proc.stdout.close()  # `agentctl run -- yes | head -1`
        assert proc.wait(20) == 141
    finally:
        proc.kill()
        proc.wait()
    assert newest_task(agent)["state"] == "cancelled"


def test_start_logs_cancel_and_purge_a_task(agent):
    started = agentctl(agent, "start", "--", "sh", "-c", "echo hello; echo oops >&2; sleep 60")
    task_id = started.stdout.decode().strip()
    assert started.returncode == 0 and len(task_id) == 32, started
    deadline = time.monotonic() + 10
    while record(agent, task_id)["stderr_bytes"] < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agentctl(agent, "logs", task_id).stdout == b"hello\n"
    assert agentctl(agent, "logs", "--stderr", task_id).stdout == b"oops\n"  # to pipe it
    refused = agentctl(agent, "purge", task_id)
    assert refused.returncode == 125 and "cancel it first" in one_line_error(refused)
    cancelled = agentctl(agent, "cancel", task_id)
    assert cancelled.stdout.decode() == f"{task_id} cancelled\n"
    followed = agentctl(agent, "logs", "-f", "--both", task_id)
    assert (followed.returncode, followed.stdout, followed.stderr) == (0, b"hello\n", b"oops\n")
    assert agentctl(agent, "purge", task_id).stdout.decode() == f"{task_id} purged\n"
    gone = agentctl(agent, "show", task_id)
    assert gone.returncode == 125 and "no task with id" in one_line_error(gone)


def test_tasks_by_door(agent):
    client = agent.connect()
    client.send({"command": ["echo", "by tcp"]})
    assert client.receive()["exit_code"] == 0
    client.close()
    assert agentctl(agent, "run", "--", "echo", "by http").returncode == 0
    by_door = {door: json.loads(agentctl(agent, "tasks", "--door", door, "--json").stdout)
               for door in ("tcp", "http")}
    assert by_door["tcp"] and all(t["source"] == "tcp" for t in by_door["tcp"])
    assert by_door["tcp"][0]["command"] == ["echo", "by tcp"]
    assert by_door["http"] and all(t["source"] == "http" for t in by_door["http"])
    table = agentctl(agent, "tasks", "--door", "tcp").stdout.decode().splitlines()
    assert table[0].split()[:2] == ["ID", "STATE"] and "echo 'by tcp'" in table[1]


def test_health_needs_no_token(agent, tmp_path):
    result = agentctl(agent, "health", token_file=tmp_path / "none")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rb"ok: \d+ running, history writable\n", result.stdout), result.stdout


def test_a_wrong_token_is_one_line_and_exit_125(agent, tmp_path):
    (tmp_path / "token").write_text("not-the-token\n")
    result = agentctl(agent, "run", "--", "echo", "never", token_file=tmp_path / "token")
    assert result.returncode == 125 and result.stdout == b""
    assert "the bearer token is not valid (HTTP 401)" in one_line_error(result)


def test_no_agent_is_one_line_and_exit_125(agent):
    with socket.socket() as bound:  # a port of ours that nothing listens on
        bound.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{bound.getsockname()[1]}"
        result = agentctl(agent, "tasks", url=url)
    assert result.returncode == 125
    assert "Connection refused" in one_line_error(result)


class DroppingProxy:
    """A TCP proxy in front of the agent that can cut every connection through it at once."""

    def __init__(self, port: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.upstream_port = port
        self.requests: list[bytes] = []
        self.open: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self.lock:
                self.open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source, sink, is_request):
        try:
            while data := source.recv(65536):
                if is_request:
                    self.requests.append(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def drop(self):
        with self.lock:
            cut, self.open = self.open, []
        for s in cut:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.listener.close()
        self.drop()


def test_logs_follow_resumes_after_the_connection_drops_without_losing_or_repeating_a_byte(agent):
    script = ("import sys, time\nfor i in range(30):\n    print(f'out {i}', flush=True)\n"
              "    print(f'err {i}', file=sys.stderr, flush=True)\n    time.sleep(0.05)\n")
    task_id = agentctl(agent, "start", "--", sys.executable, "-c", script).stdout.decode().strip()
    proxy = DroppingProxy(agent.ports["HTTP API"])
    proc = spawn_agentctl(agent, "logs", "-f", "--both", task_id, url=proxy.url)
    try:
        first = [proc.stdout.readline() for _ in range(3)]
        proxy.drop()
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
        proxy.close()
    assert proc.returncode == 0, err
    assert b"".join(first) + out == b"".join(b"out %d\n" % i for i in range(30))
    assert err == b"".join(b"err %d\n" % i for i in range(30))
    resumed = [r for r in proxy.requests[1:] if r.startswith(b"GET ")]
    assert resumed and b"stdout_offset=0" not in resumed[0], proxy.requests
