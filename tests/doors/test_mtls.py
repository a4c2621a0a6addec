"""The `mtls:` endpoint string: found by serverFromString through the plugin in
twisted/plugins/agent_endpoints.py, refused with a reason when it cannot
authenticate clients, and listening with a client-certificate requirement."""
from __future__ import annotations

import pytest
from OpenSSL import SSL
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.plugin import getPlugins

from agent.doors import mtls
from tests.tlsfiles import make_tls_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def _listened(description: str):
    """(port, contextFactory, backlog, interface) the endpoint asks the reactor to listen with."""
    reactor = MemoryReactor()
    endpoint = serverFromString(reactor, description)
    assert isinstance(endpoint, SSL4ServerEndpoint)
    endpoint.listen(Factory.forProtocol(Protocol))
    [(port, _, context_factory, backlog, interface)] = reactor.sslServers
    return port, context_factory, backlog, interface


def test_the_plugin_makes_the_parser_twisted_finds_by_prefix():
    parsers = [p for p in getPlugins(IStreamServerEndpointStringParser) if p.prefix == "mtls"]
    assert [type(p) for p in parsers] == [mtls.MutualTLSServerParser]


def test_an_mtls_string_listens_requiring_a_client_certificate_the_ca_signed(files):
    port, context_factory, backlog, interface = _listened(
        files.mtls(3443, interface="127.0.0.1", backlog="7"))
    assert (port, backlog, interface) == (3443, 7, "127.0.0.1")
    context = context_factory.getContext()
    mode = context.get_verify_mode()
    assert mode & SSL.VERIFY_PEER and mode & SSL.VERIFY_FAIL_IF_NO_PEER_CERT


def test_like_tcp_and_ssl_it_binds_every_interface_unless_told(files):
    _, _, backlog, interface = _listened(files.mtls(3443))
    assert (backlog, interface) == (50, "")


def test_an_ipv6_interface_is_taken_as_given(files):
    assert _listened(files.mtls(3443, interface=r"\:\:1"))[3] == "::1"


def test_one_file_may_hold_the_key_and_the_certificate(files, tmp_path):
    both = tmp_path / "both.pem"
    both.write_bytes(files.server_key.read_bytes() + files.server_cert.read_bytes())
    assert _listened(f"mtls:0:privateKey={both}:caCerts={files.ca}")[0] == 0


def test_without_ca_certs_it_refuses_and_says_why(files):
    with pytest.raises(mtls.MutualTLSError,
                       match=r"^mtls: caCerts=CA\.pem is required: .*which lets any client in\); "
                             r"the form is mtls:PORT:privateKey=KEY\.pem"):
        serverFromString(MemoryReactor(),
                         f"mtls:0:privateKey={files.server_key}:certKey={files.server_cert}")


@pytest.mark.parametrize("description, message", [
    ("mtls:0:caCerts={ca}", "privateKey=KEY.pem is required"),
    ("mtls:privateKey={key}:certKey={cert}:caCerts={ca}", "the port must be a number"),
    ("mtls:http:privateKey={key}:certKey={cert}:caCerts={ca}", "not 'http'"),
    ("mtls:0:1:privateKey={key}:certKey={cert}:caCerts={ca}", "only one port"),
    ("mtls:0:privateKey={key}:certKey={cert}:caCerts={ca}:cacerts=x:ca=y", "unknown keyword ca, cacerts"),
    ("mtls:0:privateKey={key}:certKey={cert}:caCerts={ca}:backlog=many", "backlog must be a number"),
    ("mtls:0:privateKey={key}:certKey={cert}:caCerts={key}", "server.key holds no PEM certificate"),
    ("mtls:0:privateKey={key}:caCerts={ca}", "server.key holds no PEM certificate"),
    ("mtls:0:privateKey={ca}:certKey={cert}:caCerts={ca}", "ca.pem holds no PEM private key"),
    ("mtls:0:privateKey={key}:certKey={cert}:caCerts={ca}.gone",
     "cannot read the CA certificates file .*ca.pem.gone: No such file or directory"),
])
def test_a_string_that_cannot_make_the_door_is_refused_with_a_reason(files, description, message):
    description = description.format(key=files.server_key, cert=files.server_cert, ca=files.ca)
    with pytest.raises(mtls.MutualTLSError, match=message):
        serverFromString(MemoryReactor(), description)


@pytest.mark.parametrize("description, expected", [
    ("mtls:3443:privateKey=k:caCerts=c", True),
    ("MTLS:3443", True),
    ("ssl:3443:privateKey=k", False),
    ("tcp:3000:interface=127.0.0.1", False),
    ("unix:/run/mtls:sock", False),
])
def test_requires_client_certificates_knows_an_mtls_string(description, expected):
    assert mtls.requires_client_certificates(description) is expected
