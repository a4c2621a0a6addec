"""A real `twistd -n agent` with both doors on mtls: endpoints: a client with a
certificate the agent's CA signed runs tasks through each door and through
agent-scheduler; a client without one, or with one another CA signed, is
refused at the handshake and nothing runs."""
from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO, LineClient
from tests.tlsfiles import make_tls_files

DOORS = ("TCP task protocol", "HTTP API")


@pytest.fixture
def files(tmp_path):
    return make_tls_files(tmp_path / "tls")


@pytest.fixture
def agent(start_agent, files, tmp_path):
    door = files.mtls(0, interface="127.0.0.1")
    return start_agent("--listen", door, "--http", door, "--data-dir", str(tmp_path / "data"),
                       doors=DOORS)


def _context(files, who: str | None = "client") -> ssl.SSLContext:
    """Trusts the agent's CA; shows the client certificate, a stranger's, or none."""
    context = ssl.create_default_context(cafile=str(files.ca))
    if who == "client":
        context.load_cert_chain(str(files.client_cert), str(files.client_key))
    elif who == "stranger":
        context.load_cert_chain(str(files.stranger_cert), str(files.stranger_key))
    return context


def _tls_socket(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


def _https(agent, context) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection("127.0.0.1", agent.ports["HTTP API"], timeout=15,
                                       context=context)


def _token(tmp_path) -> str:
    return (tmp_path / "data" / "token").read_text().strip()


def _run_over_http(agent, context, token, argv):
    connection = _https(agent, context)
    try:
        connection.request("POST", "/run", json.dumps({"command": argv[0], "args": argv[1:]}),
                           {"Authorization": f"Bearer {token}",
                            "Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_a_client_with_a_certificate_the_ca_signed_runs_a_task_through_each_door(
        agent, files, tmp_path):
    client = LineClient(_tls_socket(agent.tcp_port, _context(files)))
    try:
        client.send({"command": ["echo", "over tcp"]})
        result = client.receive()
    finally:
        client.close()
    assert (result["exit_code"], result["output"]) == (0, "over tcp\n"), result
    agent.wait_for_log("by cert:CN=")  # launched_by: the certificate's subject, not the peer

    assert _run_over_http(agent, _context(files), _token(tmp_path), ["echo", "over http"]) == (
        200, b"over http\n")
    agent.wait_for_log("TCP task protocol: clients need a certificate")
    agent.wait_for_log("HTTP API: clients need a certificate")
    assert "protected mode" not in agent.log
    assert agent.stop() == 0
    assert "Traceback" not in agent.log, agent.log


def _refused(do) -> BaseException:
    """The exception a refused client gets. With TLS 1.3 the client's side of the
    handshake ends before the agent checks its certificate: the agent's alert (or
    its closing) arrives on the first read, before any request is read."""
    try:
        do()
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError, EOFError,
            http.client.RemoteDisconnected) as e:
        return e
    raise AssertionError("the agent served a client it should have refused")


@pytest.mark.parametrize("who", [None, "stranger"], ids=["no certificate", "another CA"])
def test_a_client_without_a_certificate_the_ca_signed_is_refused_and_nothing_runs(
        agent, files, tmp_path, who):
    marker = tmp_path / "ran"

    def over_tcp():
        client = LineClient(_tls_socket(agent.tcp_port, _context(files, who)))
        try:
            client.send({"command": ["touch", str(marker)]})
            client.receive()
        finally:
            client.close()

    def over_http():
        _run_over_http(agent, _context(files, who), _token(tmp_path), ["touch", str(marker)])

    _refused(over_tcp)
    _refused(over_http)
    # A trusted client is served after them, so the refused requests had their chance to run.
    assert _run_over_http(agent, _context(files), _token(tmp_path), ["true"])[0] == 200
    assert not marker.exists()
    assert agent.stop() == 0


@pytest.mark.parametrize("who", [None, "stranger"], ids=["no certificate", "another CA"])
def test_with_tls_1_2_the_refusal_is_the_handshake_itself(agent, files, who):
    """TLS 1.2 finishes the handshake only after the agent checked the certificate."""
    context = _context(files, who)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    for door in DOORS:
        with pytest.raises(ssl.SSLError, match="(?i)handshake failure|certificate required|"
                                               "unknown ca|bad certificate"):
            _tls_socket(agent.ports[door], context).close()
    assert agent.stop() == 0


def _scheduler(*args, input_text: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.clients.scheduler", *map(str, args)],
                          input=input_text, capture_output=True, text=True, timeout=60,
                          cwd=REPO)


def test_agent_scheduler_with_a_client_certificate_runs_tasks_over_mtls(agent, files):
    requests = "".join(json.dumps({"command": ["echo", str(n)]}) + "\n" for n in range(3))
    done = _scheduler("--agent", f"localhost:{agent.tcp_port}", "--ca", files.ca,
                      "--cert", files.client_cert, "--key", files.client_key,
                      input_text=requests)
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(line)["output"] for line in done.stdout.splitlines()) == [
        "0\n", "1\n", "2\n"]
    assert "3 sent, 3 ok" in done.stderr

    refused = _scheduler("--agent", f"127.0.0.1:{agent.tcp_port}", "--ca", files.ca,
                         input_text=requests)
    assert refused.returncode == 1 and refused.stdout == ""
    assert "TLS" in refused.stderr, refused.stderr
    assert agent.stop() == 0


def _agentctl(agent, tmp_path, *args, env_extra=None):
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "agent.clients.ctl",
                           "--url", f"https://127.0.0.1:{agent.ports['HTTP API']}",
                           "--token-file", str(tmp_path / "data" / "token"), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)


def test_agentctl_with_a_client_certificate_runs_a_task_over_mtls(agent, files, tmp_path):
    ran = _agentctl(agent, tmp_path, "--ca", str(files.ca), "--cert", str(files.client_cert),
                    "--key", str(files.client_key), "run", "--", "echo", "over agentctl")
    assert (ran.returncode, ran.stdout) == (0, "over agentctl\n"), ran.stderr
    from_env = _agentctl(agent, tmp_path, "health",
                         env_extra={"AGENT_CA": str(files.ca), "AGENT_CERT": str(files.client_cert),
                                    "AGENT_KEY": str(files.client_key)})
    assert from_env.returncode == 0, from_env.stderr


def test_agentctl_without_a_client_certificate_is_refused_in_one_line(agent, files, tmp_path):
    refused = _agentctl(agent, tmp_path, "--ca", str(files.ca), "run", "--", "echo", "no")
    assert refused.returncode == 125 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert agent.stop() == 0
    assert "task " not in "\n".join(l for l in agent.log.splitlines() if "exited" in l)
