"""agent-scheduler --ca/--cert/--key against an in-process fake agent behind an
mTLS door: TLS with a client certificate, the agent's certificate checked
against --ca for the --agent host, and clear complaints when either side refuses."""
from __future__ import annotations

import io
import re

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python import usage

from agent import tls
from agent.clients import scheduler as scheduler_module
from agent.clients.scheduler import Options, Scheduler
from tests.clients.test_scheduler import FakeAgentProtocol, FakeNode, _printed, _task
from tests.tlsfiles import CLIENT_CN, make_tls_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls"))


class MutualTLSNode(FakeNode):
    """The fake agent behind an mTLS door; `peers` holds each request's client subject."""

    def __init__(self, files, **kwargs):
        super().__init__(**kwargs)
        self._options = tls.server_options(
            tls.load_identity(str(files.server_cert), str(files.server_key)),
            tls.load_authorities(str(files.ca)))
        self.peers: list[str | None] = []

    async def start(self):
        factory = Factory.forProtocol(_Recording)
        factory.node = self
        self._port = await SSL4ServerEndpoint(reactor, 0, self._options,
                                              interface="127.0.0.1").listen(factory)
        self.address = ("127.0.0.1", self._port.getHost().port)
        return self


class _Recording(FakeAgentProtocol):
    def lineReceived(self, line):
        self.factory.node.peers.append(tls.peer_certificate_subject(self.transport))
        super().lineReceived(line)


async def _run(node, client_tls, host="127.0.0.1"):
    out, err = io.BytesIO(), io.StringIO()
    scheduler = Scheduler(reactor, [(host, node.address[1])], out=out, err=err, tls=client_tls)
    try:
        await scheduler.spread([_task("a"), _task("b")])
    finally:
        await node.stop()
    return scheduler, out, err.getvalue()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest_twisted.ensureDeferred
async def test_with_a_certificate_the_agent_trusts_the_tasks_run_over_tls(files, host):
    node = await MutualTLSNode(files).start()
    client = tls.ClientTLS.from_files(str(files.ca), str(files.client_cert), str(files.client_key))
    scheduler, out, err = await _run(node, client, host)
    assert [r["output"] for r in _printed(out)] == ["ran a – ok\n", "ran b – ok\n"], err
    assert node.peers == [f"CN={CLIENT_CN}"] * 2
    assert scheduler.summary.missing == 0


@pytest_twisted.ensureDeferred
async def test_an_agent_whose_certificate_another_ca_signed_is_not_sent_a_task(files):
    node = await MutualTLSNode(files).start()
    client = tls.ClientTLS.from_files(str(files.other_ca), str(files.client_cert),
                                      str(files.client_key))
    scheduler, out, err = await _run(node, client)
    assert node.received == [] and out.getvalue() == b""
    assert f"cannot connect to 127.0.0.1:{node.address[1]}: TLS: certificate verify failed" in err
    assert scheduler.summary.missing == 2


@pytest_twisted.ensureDeferred
async def test_without_a_client_certificate_the_agent_refuses_and_the_scheduler_says_tls(files):
    node = await MutualTLSNode(files).start()
    scheduler, out, err = await _run(node, tls.ClientTLS.from_files(str(files.ca)))
    assert node.received == [] and out.getvalue() == b""
    # TLS 1.3: the refusal arrives as an alert after our side's handshake; 1.2: during it
    assert re.search(r"TLS.*(certificate required|handshake failure)", err), err
    assert scheduler.summary.missing == 2


@pytest_twisted.ensureDeferred
async def test_an_agent_that_never_answers_the_handshake_is_given_up_on(files, monkeypatch):
    monkeypatch.setattr(scheduler_module, "CONNECT_TIMEOUT", 0.2)
    silent = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Factory.forProtocol(Protocol))  # accepts, reads, says nothing
    port = silent.getHost().port
    out, err = io.BytesIO(), io.StringIO()
    scheduler = Scheduler(reactor, [("127.0.0.1", port)], out=out, err=err,
                          tls=tls.ClientTLS.from_files(str(files.ca)))
    try:
        await scheduler.spread([_task("a")])
    finally:
        await silent.stopListening()
    assert (f"cannot connect to 127.0.0.1:{port}: no TLS handshake within 0.2 s"
            in err.getvalue()), err.getvalue()
    assert scheduler.summary.missing == 1


def _options(*args):
    options = Options()
    options.parseOptions(list(args))
    return options


def test_the_tls_options_load_the_files_once(files):
    options = _options("--ca", str(files.ca), "--cert", str(files.client_cert),
                       "--key", str(files.client_key))
    assert options["tls"].identity is not None and len(options["tls"].authorities) == 1
    assert _options("--ca", str(files.ca))["tls"].identity is None
    assert _options()["tls"] is None


@pytest.mark.parametrize("args, message", [
    (["--cert", "c.pem", "--key", "k.pem"], "--cert needs --ca"),
    (["--ca", "ca.pem", "--key", "k.pem"], "--key goes with --cert"),
    (["--ca", "/nonexistent/ca.pem"], "cannot read the CA certificates file /nonexistent/ca.pem"),
])
def test_bad_tls_options_are_usage_errors(args, message):
    with pytest.raises(usage.UsageError, match=message):
        _options(*args)
