"""agent.tls: certificates from PEM files, both ends' TLS options, and who the
peer is, over real TLS connections on 127.0.0.1 with throwaway certificates."""
from __future__ import annotations

import pytest
import pytest_twisted
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (SSL4ServerEndpoint, TCP4ClientEndpoint, connectProtocol,
                                        wrapClientTLS)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import VerificationError
from twisted.internet.testing import StringTransport

from agent import tls
from tests.tlsfiles import CLIENT_CN, make_tls_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls"))


# -- loading files


def test_a_ca_bundle_gives_every_certificate_in_it(files, tmp_path):
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(files.ca.read_bytes() + b"\n" + files.other_ca.read_bytes())
    names = [c.original.to_cryptography().subject.rfc4514_string()
             for c in tls.load_authorities(str(bundle))]
    assert names == ["CN=agent test CA", "CN=some other CA"]


@pytest.mark.parametrize("content, message", [
    (None, r"cannot read the CA certificates file .*nope\.pem: No such file or directory"),
    (b"not a certificate\n", r"nope\.pem holds no PEM certificate"),
])
def test_a_ca_file_that_is_missing_or_holds_no_certificate_is_named(tmp_path, content, message):
    path = tmp_path / "nope.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        tls.load_authorities(str(path))


def test_an_identity_is_a_certificate_and_its_key_from_one_file_or_two(files, tmp_path):
    combined = tmp_path / "both.pem"
    combined.write_bytes(files.client_key.read_bytes() + files.client_cert.read_bytes())
    for cert, key in [(files.client_cert, files.client_key), (combined, combined)]:
        identity = tls.load_identity(str(cert), str(key))
        assert identity.original.to_cryptography().subject.rfc4514_string() == f"CN={CLIENT_CN}"


def test_a_key_that_does_not_belong_to_the_certificate_is_refused(files):
    with pytest.raises(ValueError, match="the private key in .*stranger.key does not belong to "
                                         "the certificate in .*client.pem"):
        tls.load_identity(str(files.client_cert), str(files.stranger_key))


def test_an_encrypted_key_is_refused_with_a_reason_instead_of_a_passphrase_prompt(files, tmp_path):
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(files.client_key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ValueError, match="is encrypted: the agent starts unattended"):
        tls.load_identity(str(files.client_cert), str(encrypted))


def test_a_file_without_a_key_is_named(files):
    with pytest.raises(ValueError, match=r"ca\.pem holds no PEM private key"):
        tls.load_identity(str(files.client_cert), str(files.ca))


def test_the_server_options_require_a_verified_client_certificate(files):
    options = tls.server_options(tls.load_identity(str(files.server_cert), str(files.server_key)),
                                 tls.load_authorities(str(files.ca)))
    mode = options.getContext().get_verify_mode()
    assert mode & SSL.VERIFY_PEER and mode & SSL.VERIFY_FAIL_IF_NO_PEER_CERT


# -- real handshakes


class _Answer(Protocol):
    """Server side: answers the first bytes with the peer's subject, then closes."""

    def dataReceived(self, data):
        subject = tls.peer_certificate_subject(self.transport)
        self.factory.seen.append(subject)
        self.transport.write(repr(subject).encode())
        self.transport.loseConnection()


class _Ask(Protocol):
    """Client side: sends a line, keeps what comes back, fires (answer, reason) at the end."""

    def __init__(self):
        self.done = Deferred()
        self.answer = b""

    def connectionMade(self):
        self.transport.write(b"who am I?\n")

    def dataReceived(self, data):
        self.answer += data

    def connectionLost(self, reason):
        self.done.callback((self.answer, reason))


async def _exchange(files, server_options, client_options):
    """What the client got back, what the server saw (subjects), and why the connection ended."""
    factory = Factory.forProtocol(_Answer)
    factory.seen = []
    port = await SSL4ServerEndpoint(reactor, 0, server_options, interface="127.0.0.1").listen(factory)
    try:
        client = wrapClientTLS(client_options,
                               TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port))
        protocol = await connectProtocol(client, _Ask())
        answer, reason = await protocol.done
    finally:
        await port.stopListening()
    return answer, factory.seen, reason


def _server(files, ca=None):
    return tls.server_options(tls.load_identity(str(files.server_cert), str(files.server_key)),
                              tls.load_authorities(str(ca or files.ca)))


def _client(files, cert=None, key=None, ca=None, hostname="127.0.0.1"):
    identity = tls.load_identity(str(cert), str(key)) if cert else None
    return tls.client_options(hostname, identity, tls.load_authorities(str(ca or files.ca)))


@pytest_twisted.ensureDeferred
async def test_a_client_with_a_certificate_the_ca_signed_is_served_and_named(files):
    answer, seen, _ = await _exchange(files, _server(files),
                                      _client(files, files.client_cert, files.client_key))
    assert seen == [f"CN={CLIENT_CN}"]
    assert answer == repr(f"CN={CLIENT_CN}").encode()


@pytest_twisted.ensureDeferred
async def test_a_client_without_a_certificate_is_refused_at_the_handshake(files):
    answer, seen, reason = await _exchange(files, _server(files), _client(files))
    assert (answer, seen) == (b"", [])
    assert reason.check(SSL.Error), reason


@pytest_twisted.ensureDeferred
async def test_a_client_with_a_certificate_another_ca_signed_is_refused_at_the_handshake(files):
    answer, seen, reason = await _exchange(files, _server(files),
                                           _client(files, files.stranger_cert, files.stranger_key))
    assert (answer, seen) == (b"", [])
    assert reason.check(SSL.Error), reason


@pytest_twisted.ensureDeferred
async def test_a_certificate_whose_key_usage_excludes_clients_is_refused(files):
    """The server's own certificate (extendedKeyUsage serverAuth only) is no client's."""
    answer, seen, reason = await _exchange(files, _server(files),
                                           _client(files, files.server_cert, files.server_key))
    assert (answer, seen) == (b"", [])
    assert reason.check(SSL.Error), reason


@pytest_twisted.ensureDeferred
async def test_the_client_refuses_a_server_its_ca_did_not_sign(files):
    answer, seen, reason = await _exchange(
        files, _server(files), _client(files, files.client_cert, files.client_key,
                                       ca=files.other_ca))
    assert (answer, seen) == (b"", [])
    assert reason.check(SSL.Error), reason


@pytest_twisted.ensureDeferred
async def test_the_client_refuses_a_server_certificate_for_another_host(files):
    answer, seen, reason = await _exchange(
        files, _server(files), _client(files, files.client_cert, files.client_key,
                                       hostname="agent.example.com"))
    assert (answer, seen) == (b"", [])
    assert reason.check(VerificationError), reason


@pytest_twisted.ensureDeferred
async def test_the_server_certificate_names_localhost_too(files):
    answer, seen, _ = await _exchange(files, _server(files),
                                      _client(files, files.client_cert, files.client_key,
                                              hostname="localhost"))
    assert seen == [f"CN={CLIENT_CN}"]


def test_a_plain_transport_has_no_peer_certificate():
    assert tls.peer_certificate_subject(StringTransport()) is None
    assert tls.peer_certificate_subject(object()) is None
