"""The TCP agent as a scheduler sees it: a real twistd process and a real socket."""
from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from tests.e2e.conftest import REPO, TWISTD, LineClient
from tests.procs import group_members, processes_where, wait_until_empty

REFERENCE_INPUT = REPO / "examples" / "input.json"


def _reference_requests():
    return [json.loads(line) for line in REFERENCE_INPUT.read_text().splitlines() if line.strip()]


def _send_paced(client, requests, pace_s=0.2):
    """What seed A's reference scheduler does: one line every 200 ms, no waiting."""
    for i, request in enumerate(requests):
        if i:
            time.sleep(pace_s)
        client.send(request)
    return client.receive_many(len(requests))


@pytest.fixture
def cmd_dir(tmp_path):
    shutil.copy(REPO / "examples" / "cmd", tmp_path / "cmd")
    return tmp_path


def test_reference_scenario_in_milliseconds(start_agent, cmd_dir):
    agent = start_agent("--timeout-unit", "ms", cwd=cmd_dir)
    results = _send_paced(agent.connect(), _reference_requests())
    by_command = {tuple(r["command"]): r for r in results}
    first, second, third, fourth = (by_command[tuple(r["command"])] for r in _reference_requests())
    assert first["exit_code"] == 0 and first["error"] == "" and first["output"].strip()
    assert second["error"] == third["error"] == "cannot allow concurrent executions"
    assert second["exit_code"] == third["exit_code"] == -1
    assert fourth["exit_code"] == -1 and fourth["error"] == "timeout exceeded"


def test_reference_scenario_in_seconds_lets_the_fourth_finish(start_agent, cmd_dir):
    agent = start_agent(cwd=cmd_dir)
    results = _send_paced(agent.connect(), _reference_requests())
    fourth = next(r for r in results if r["command"] == ["./cmd", "-w", "200"])
    assert fourth["exit_code"] == 0 and fourth["error"] == ""


def test_parallel_zero_runs_pipelined_tasks_at_once(start_agent):
    agent = start_agent("--parallel", "0")
    client = agent.connect()
    started = time.monotonic()
    client.send(*({"command": ["sleep", "0.8"], "id": str(i)} for i in range(10)))
    results = client.receive_many(10)
    elapsed = time.monotonic() - started
    assert sorted(r["id"] for r in results) == [str(i) for i in range(10)]
    assert all(r["exit_code"] == 0 for r in results)
    assert elapsed < 2.0, f"10 pipelined 0.8 s tasks took {elapsed:.2f} s"


def test_three_hundred_sequential_tasks_on_one_connection(start_agent):
    agent = start_agent()
    client = agent.connect()
    for i in range(300):
        client.send({"command": ["echo", str(i)]})
        result = client.receive()
        assert (result["exit_code"], result["output"]) == (0, f"{i}\n")


def test_queue_mode_runs_tasks_in_arrival_order(start_agent, tmp_path):
    agent = start_agent("--when-busy", "queue")
    client = agent.connect()
    order = tmp_path / "order"
    client.send(*({"command": ["sh", "-c", f"sleep 0.05; echo {i} >> {order}"], "id": str(i)}
                  for i in range(8)))
    results = client.receive_many(8)
    assert [r["id"] for r in results] == [str(i) for i in range(8)]
    assert order.read_text().split() == [str(i) for i in range(8)]


def test_queued_tasks_from_two_connections_share_one_slot(start_agent):
    agent = start_agent("--when-busy", "queue")
    first, second = agent.connect(), agent.connect()
    first.send({"command": ["sleep", "0.3"]})
    time.sleep(0.1)
    started = time.monotonic()
    second.send({"command": ["true"]})
    assert second.receive()["exit_code"] == 0
    assert time.monotonic() - started > 0.1, "the second connection did not wait for the slot"
    assert first.receive()["exit_code"] == 0


def test_fifty_mebibytes_of_output_arrive_intact(start_agent):
    agent = start_agent()
    client = agent.connect()
    size = 50 * 1024 * 1024
    script = f"import sys; sys.stdout.buffer.write(bytes(range(32, 127)) * ({size} // 95) + b'x' * ({size} % 95))"
    client.send({"command": [sys.executable, "-c", script]})
    result = client.receive()
    assert result["exit_code"] == 0
    expected = (bytes(range(32, 127)) * (size // 95) + b"x" * (size % 95))
    assert hashlib.sha256(result["output"].encode()).hexdigest() == hashlib.sha256(expected).hexdigest()


def test_non_utf8_output_is_replaced_and_the_line_stays_json(start_agent):
    agent = start_agent()
    client = agent.connect()
    client.send({"command": ["printf", "ok\\377\\376end"]})
    assert client.receive()["output"] == "ok\ufffd\ufffdend"


def test_bad_lines_get_errors_and_the_connection_stays_usable(start_agent):
    agent = start_agent("--max-line", "1000")
    client = agent.connect()
    client.send(b"{nope\n", b"[]\n", b"\n", b'{"command": 1}\r\n', b"x" * 5000 + b"\n",
                {"command": ["echo", "still here"]})
    errors = client.receive_many(4)
    assert all(e["exit_code"] == -1 and e["error"] for e in errors)
    assert "longer than 1000 bytes" in errors[3]["error"]
    assert client.receive()["output"] == "still here\n"


def test_missing_binary_is_a_start_failure_not_an_exit_code(start_agent):
    agent = start_agent()
    client = agent.connect()
    client.send({"command": ["./no-such-program"], "id": "m"}, {"command": ["sh", "-c", "exit 1"]})
    missing, exits_one = client.receive(), client.receive()
    assert missing == {"command": ["./no-such-program"], "exit_code": -1, "id": "m",
                       "error": "cannot start './no-such-program': No such file or directory"}
    assert exits_one["exit_code"] == 1 and exits_one["error"] == "" and "executed_at" in exits_one


def test_timeout_of_a_shell_whose_grandchild_holds_stdout(start_agent):
    agent = start_agent()
    client = agent.connect()
    started = time.monotonic()
    client.send({"command": ["sh", "-c", "(sleep 60; echo late) & echo early; sleep 60"],
                 "timeout": 0.5})
    result = client.receive()
    assert time.monotonic() - started < 5
    assert (result["exit_code"], result["error"], result["output"]) == (-1, "timeout exceeded",
                                                                        "early\n")
    assert not wait_until_empty(lambda sid: [p for p in processes_where(3, sid)
                                             if p != agent.proc.pid], agent.proc.pid)


def test_disconnect_kills_the_running_group_within_a_second(start_agent):
    agent = start_agent()
    client = agent.connect()
    client.send({"command": ["sh", "-c", "sleep 60 & sleep 60"]})
    sleepers = _wait_for_children(agent, 2)
    pgid = os.getpgid(sleepers[0])
    client.close()
    assert not wait_until_empty(group_members, pgid, timeout=1.5)
    # the node is free again at once
    assert agent.connect().send({"command": ["true"]}) is None


def test_half_close_still_delivers_pending_results(start_agent):
    agent = start_agent("--parallel", "0")
    client = agent.connect()
    client.send({"command": ["sh", "-c", "sleep 1; echo done"], "id": "slow"},
                {"command": ["echo", "fast"], "id": "fast"})
    client.half_close()
    results = client.receive_many(2)
    assert {r["id"]: r["output"] for r in results} == {"slow": "done\n", "fast": "fast\n"}
    assert client.reader.read() == b"", "the agent closes once every result is sent"


def test_sigterm_exits_zero_and_leaves_no_children(start_agent):
    agent = start_agent("--parallel", "0")
    client = agent.connect()
    client.send({"command": ["sh", "-c", "sleep 60 & sleep 60"]}, {"command": ["sleep", "60"]})
    _wait_for_children(agent, 3)
    assert agent.stop(signal.SIGTERM) == 0
    assert not agent.survivors()


def test_stopping_gives_tasks_a_sigterm_and_the_grace_then_sigkill(start_agent, tmp_path):
    """A task that cleans up on SIGTERM gets to; one that ignores it is killed
    after --shutdown-grace; the history says how each ended, cleanup verified."""
    marker = tmp_path / "cleaned-up"
    agent = start_agent("--parallel", "0", "--shutdown-grace", "1", "--data-dir", "data")
    client = agent.connect()
    client.send({"command": ["sh", "-c", f"trap 'echo bye > {marker}; exit 0' TERM; "
                                         "sleep 60 & wait"], "id": "polite"},
                {"command": ["sh", "-c", "trap '' TERM; sleep 60 & wait"], "id": "stubborn"})
    late = agent.connect()  # open before the stop: connections outlive the listening port
    _wait_for_children(agent, 4)
    started = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    agent.wait_for_log("stopping: 2 running task(s)")
    late.send({"command": ["sleep", "60"], "id": "late"})  # during the grace: started never
    assert late.receive() == {"command": ["sleep", "60"], "exit_code": -1,
                              "error": "agent shutting down", "id": "late"}
    assert agent.proc.wait(15) == 0
    took = time.monotonic() - started
    assert not agent.survivors()
    assert marker.read_text() == "bye\n", "the task's SIGTERM handler did not run"
    answers = {r["id"]: r["error"] for r in client.receive_many(2)}  # the client still hears
    assert answers == {"polite": "agent shutting down", "stubborn": "agent shutting down"}
    assert 0.9 <= took < 10, f"stopped after {took:.1f} s with a 1 s grace"
    assert "stopping: 2 running task(s) get SIGTERM, SIGKILL after 1.0 s" in agent.log
    with sqlite3.connect(tmp_path / "data" / "history.sqlite3") as db:
        rows = {row[0]: row[1:] for row in db.execute(
            "SELECT request_id, state, error, cleanup FROM tasks")}
    assert rows == {"polite": ("cancelled", "agent shutting down", "complete"),
                    "stubborn": ("cancelled", "agent shutting down", "complete")}


def test_a_second_sigterm_while_stopping_kills_the_tasks_at_once(start_agent):
    agent = start_agent("--shutdown-grace", "60")
    client = agent.connect()
    client.send({"command": ["sh", "-c", "trap '' TERM; sleep 60 & wait"], "id": "stubborn"})
    _wait_for_children(agent, 2)
    started = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    agent.wait_for_log("stopping: 1 running task(s) get SIGTERM, SIGKILL after 60.0 s")
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(15) == 0
    assert time.monotonic() - started < 10, "the second SIGTERM did not cut the grace short"
    assert not agent.survivors()
    assert "SIGTERM again while stopping: killing 1 task(s) now" in agent.log
    assert "Traceback" not in agent.log
    assert client.receive()["error"] == "agent shutting down"


def _soft_nofile(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        return next(int(line.split()[3]) for line in f if line.startswith("Max open files"))


def test_a_low_open_file_limit_is_raised_and_tasks_get_the_original(start_agent):
    """Started with `ulimit -Sn 128`, the agent still runs 100 tasks at once
    (200 pipe ends), and each task gets the 128 it was started with: before
    exec while the agent holds few descriptors (a task that reads its limit
    first thing sees 128, even on one CPU, where it runs before the agent
    does), at once after the spawn when it holds more."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard open-file limit ({hard}) leaves nothing to raise to")
    agent = start_agent("--parallel", "0", nofile=128, one_cpu=True)
    assert _soft_nofile(agent.proc.pid) > 128
    agent.wait_for_log("open-file limit raised from 128")
    client = agent.connect()
    seen = []
    for n in range(20):
        client.send({"command": ["sh", "-c", "ulimit -Sn"], "id": f"first-thing{n}"})
        seen.append(client.receive()["output"])
    assert seen == ["128\n"] * 20
    client.send(*({"command": ["sleep", "30"], "id": f"s{n}"} for n in range(100)))
    client.send({"command": ["sh", "-c", "ulimit -Sn"], "id": "limit-forked",
                 "limits": {"cpu_s": 60}})  # limits take the fork path, not posix_spawn
    forked = client.receive()
    assert forked.get("output") == "128\n", forked  # and it came after the 100 spawns
    children = _wait_for_children(agent, 100)
    assert [_soft_nofile(pid) for pid in children] == [128] * 100
    assert agent.stop(signal.SIGTERM) == 0


def test_sigint_exits_zero_too(start_agent):
    agent = start_agent()
    assert agent.stop(signal.SIGINT) == 0


def test_help_lists_every_option_with_its_default():
    out = subprocess.run([*TWISTD, "agent", "--help"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), check=True).stdout
    for option, default in [("--listen", "tcp:3000:interface=127.0.0.1"), ("--timeout-unit", "s"),
                            ("--parallel", "1"), ("--when-busy", "reject"),
                            ("--max-line", "1048576")]:
        assert option in out and f"[default: {default}]" in " ".join(out.split())


def test_tac_file_builds_the_same_agent(tmp_path):
    proc = subprocess.run([*TWISTD, "--help"], capture_output=True)  # twistd itself importable
    assert proc.returncode == 0
    namespace: dict = {}
    exec(compile((REPO / "agent.tac").read_text(), "agent.tac", "exec"), namespace)
    from twisted.application.service import IServiceCollection
    services = list(IServiceCollection(namespace["application"]))
    assert services and services[0].engine is not None


def test_port_in_use_fails_start_up(start_agent, tmp_path):
    agent = start_agent()
    proc = subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "agent", "--listen", f"tcp:{agent.tcp_port}:interface=127.0.0.1"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode != 0
    assert "Address already in use" in proc.stdout + proc.stderr


def _wait_for_children(agent, n, timeout=10.0):
    """PIDs of the agent's task processes, once at least n of them run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = [p for p in processes_where(3, agent.proc.pid) if p != agent.proc.pid]
        if len(children) >= n:
            return children
        time.sleep(0.02)
    raise AssertionError(f"expected {n} task processes, saw {children}")


def test_ssl_endpoint_serves_the_same_protocol(start_agent, tmp_path):
    import ssl
    key_path, cert_path = _self_signed_certificate(tmp_path)
    agent = start_agent("--listen", f"ssl:0:interface=127.0.0.1:privateKey={key_path}:certKey={cert_path}")
    context = ssl.create_default_context(cafile=str(cert_path))
    context.check_hostname = False
    raw = socket.create_connection(("127.0.0.1", agent.tcp_port), timeout=30)
    client = LineClient(context.wrap_socket(raw))
    client.send({"command": ["echo", "over tls"]})
    assert client.receive()["output"] == "over tls\n"
    client.close()


def _self_signed_certificate(directory):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_output_limit_kills_an_endless_writer(start_agent):
    agent = start_agent("--max-output-bytes", "100000")
    client = agent.connect()
    client.send({"command": ["yes"]})
    result = client.receive()
    assert (result["exit_code"], result["error"]) == (-1, "output limit exceeded")
    assert result["output"] == "y\n" * 50000


@pytest.mark.parametrize("mode, busy", [(["--pace", "200"], 2), ([], 0)])
def test_agent_scheduler_runs_the_reference_input(start_agent, cmd_dir, mode, busy):
    agent = start_agent("--timeout-unit", "ms", cwd=cmd_dir)
    proc = subprocess.run(
        [sys.executable, "-m", "agent.clients.scheduler", "--agent", f"127.0.0.1:{agent.tcp_port}", *mode,
         str(REFERENCE_INPUT)], capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == 4
    assert sum(r["error"] == "cannot allow concurrent executions" for r in results) == busy
    assert f"4 sent, {3 - busy} ok, 0 failed, 1 timed out, {busy} busy" in proc.stderr


def test_request_limits_reach_the_task(start_agent):
    agent = start_agent()
    client = agent.connect()
    client.send({"command": ["sh", "-c", "ulimit -n"], "limits": {"nofile": 40}, "id": "ok"},
                {"command": ["true"], "limits": {"gpus": 1}, "id": "bad"})
    results = {r["id"]: r for r in client.receive_many(2)}
    assert results["ok"]["output"] == "40\n"
    assert "unknown key 'gpus'" in results["bad"]["error"]


UNITS = ["agent.service", "agent-config.service"]


@pytest.mark.parametrize("name", UNITS)
def test_the_example_systemd_unit_starts_an_agent_with_valid_options(name):
    """The example units must not rot: their ExecStart options parse (agent-config.service's
    --config file is read as examples/agent.toml, which is what it stands for), and the
    stop timeout leaves room for the grace and the cleanup checks."""
    from agent.runner.process import CLEANUP_DEADLINE
    from agent.service import Options

    unit = (REPO / "examples" / name).read_text()
    settings = dict(line.split("=", 1) for line in unit.replace("\\\n", " ").splitlines()
                    if "=" in line and not line.startswith("#"))
    argv = settings["ExecStart"].split()
    assert argv[1:4] == ["-n", "--pidfile=", "agent"]
    args = argv[4:]
    if "--config" in args:
        assert args[args.index("--config") + 1] == "/etc/agent/agent.toml"
        args[args.index("--config") + 1] = str(REPO / "examples" / "agent.toml")
    options = Options(environ={})
    options.parseOptions(args)
    assert options["data-dir"] == settings["WorkingDirectory"] == "/var/lib/agent"
    assert settings["KillMode"] == "mixed"
    assert float(settings["TimeoutStopSec"]) > options["shutdown-grace"] + CLEANUP_DEADLINE
    hardening = {"UMask": "0077", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                 "ProtectSystem": "strict", "ProtectHome": "yes"}
    assert {key: settings.get(key) for key in hardening} == hardening
    assert int(settings["TasksMax"]) > 0 and settings["MemoryMax"]


@pytest.mark.parametrize("name", UNITS)
def test_the_systemd_unit_rates_ok_in_systemd_analyze_security(tmp_path, name):
    """Its exposure was 9.2 UNSAFE before the hardening; systemd's own score keeps it honest."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (Debian's systemd package) is on every machine of this kind"
    unit = tmp_path / name
    shutil.copy(REPO / "examples" / name, unit)
    rated = subprocess.run([analyze, "security", "--offline=true", str(unit)],
                           capture_output=True, text=True, timeout=60)
    score = re.search(rf"Overall exposure level for {re.escape(name)}: ([\d.]+)", rated.stdout)
    assert score, rated.stdout + rated.stderr
    assert float(score[1]) < 3.0, rated.stdout


def test_a_config_file_sets_the_running_agents_options(start_agent, tmp_path):
    """twistd -n agent --config FILE: the file's timeout-unit makes a 300 ms timeout, and its
    parallel = 1 with when-busy = reject answers a second task busy; the environment beats it."""
    config = tmp_path / "agent.toml"
    config.write_text('timeout-unit = "ms"\nparallel = 1\nwhen_busy = "reject"\n')
    agent = start_agent("--config", str(config), env={"AGENT_PARALLEL": "2"})
    client = agent.connect()
    client.send({"command": ["sleep", "5"], "timeout": 300, "id": "slow"},
                {"command": ["sleep", "5"], "timeout": 300, "id": "second"},
                {"command": ["sleep", "5"], "timeout": 300, "id": "busy"})
    started = time.monotonic()
    results = {r["id"]: r for r in client.receive_many(3)}
    assert time.monotonic() - started < 4, "the timeouts were milliseconds, not seconds"
    assert results["busy"]["error"] == "cannot allow concurrent executions"
    for key in ("slow", "second"):
        assert (results[key]["exit_code"], results[key]["error"]) == (-1, "timeout exceeded")


def test_a_browser_form_post_to_the_tcp_door_runs_nothing(start_agent, tmp_path):
    """The cross-protocol attack: a page's <form enctype="text/plain"> POSTs to the TCP door
    and its body line is a task request. The agent closes at the request line."""
    agent = start_agent()
    marker = tmp_path / "pwned"
    body = json.dumps({"command": ["touch", str(marker)], "x": "="}).encode() + b"\r\n"
    request = (b"POST / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: text/plain\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (agent.tcp_port, len(body), body))
    with socket.create_connection(("127.0.0.1", agent.tcp_port), timeout=10) as sock:
        sock.sendall(request)
        assert sock.recv(4096) == b"", "the agent answers nothing and closes"
    agent.wait_for_log("security:")
    client = agent.connect()
    client.send({"command": ["true"], "id": "after"})
    assert client.receive()["exit_code"] == 0, "the door still serves real clients"
    assert not marker.exists()


def test_bound_beyond_loopback_the_door_says_it_is_protected_and_serves_this_host(tmp_path):
    from tests.e2e.conftest import AgentProcess
    agent = AgentProcess(["--listen", "tcp:0:interface=0.0.0.0", "--data-dir", str(tmp_path / "d")],
                         tmp_path)
    try:
        agent.wait_for_log("protected mode: the TCP door listens on 0.0.0.0")
        client = agent.connect()
        client.send({"command": ["echo", "local"]})
        assert client.receive()["output"] == "local\n"
    finally:
        assert agent.stop() == 0
        assert not agent.survivors()
