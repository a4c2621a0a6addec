"""An mtls: door in the service tree: it says at start that clients need a
certificate, and protected mode stands aside for a TCP door that authenticates."""
from __future__ import annotations

import pytest
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.logger import capturedLogs, formatEvent

from agent.options import Options
from agent.service import _door, build
from tests.tlsfiles import make_tls_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def _started(door, reactor) -> list[str]:
    with capturedLogs() as events:
        door.privilegedStartService()
        for hook, args, kwargs in reactor.whenRunningHooks:
            hook(*args, **kwargs)
    return [formatEvent(event) for event in events]


def test_an_mtls_door_says_its_clients_need_a_certificate(files):
    reactor = MemoryReactor()
    door = _door(reactor, files.mtls(0, interface="0.0.0.0"), Factory(), "TCP task protocol",
                 then=lambda address: pytest.fail("the no-authentication note was given"))
    assert _started(door, reactor) == [
        "TCP task protocol listening on 0.0.0.0:0",
        "TCP task protocol: clients need a certificate signed by the door's caCerts (mtls:)"]
    assert len(reactor.sslServers) == 1


def _tcp_factory(tmp_path, *args):
    options = Options()
    options.parseOptions(["--data-dir", str(tmp_path / "data"), *args])
    return build(options, MemoryReactor()).tcp_factory


def test_protected_mode_does_not_refuse_remote_peers_of_an_mtls_door(files, tmp_path):
    assert _tcp_factory(tmp_path, "--listen", files.mtls(3443)).protected is False


@pytest.mark.parametrize("listen", ["tcp:3000", "ssl:3443:privateKey={key}:certKey={cert}"])
def test_protected_mode_still_guards_a_door_without_client_certificates(files, tmp_path, listen):
    listen = listen.format(key=files.server_key, cert=files.server_cert)
    assert _tcp_factory(tmp_path, "--listen", listen).protected is True
