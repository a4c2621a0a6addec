"""The `mtls:` server endpoint: TLS that refuses a client without a certificate
signed by the operator's CA.

    mtls:PORT:privateKey=KEY.pem[:certKey=CERT.pem]:caCerts=CA.pem[:interface=IP][:backlog=N]

Twisted's `ssl:` endpoint has no way to ask for a client certificate, so both
doors (`--listen`, `--http`) take this one instead when clients must prove who
they are. twisted/plugins/agent_endpoints.py makes `serverFromString` find it,
as it finds Twisted's own `tcp6:` or `systemd:`.

Like `tcp:` and `ssl:`, it binds every IPv4 interface unless `interface=` says
otherwise (`interface=::` or an IPv6 address listens on IPv6): an mTLS door is
how the agent serves other hosts, and a client reaching the port still needs a
certificate to get past the handshake.
"""
from __future__ import annotations

from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer

from agent import tls

PREFIX = "mtls"
USAGE = "mtls:PORT:privateKey=KEY.pem[:certKey=CERT.pem]:caCerts=CA.pem[:interface=IP][:backlog=N]"


class MutualTLSError(ValueError):
    """An `mtls:` string that cannot make an endpoint; the message says why and how."""


def requires_client_certificates(description: str) -> bool:
    """Whether a server endpoint string is an `mtls:` one (its clients are authenticated)."""
    return description.partition(":")[0].strip().lower() == PREFIX


@implementer(IPlugin, IStreamServerEndpointStringParser)
class MutualTLSServerParser:
    """`serverFromString`'s parser for `mtls:`; every file is read when an endpoint
    is made (at the agent's start), none when the plugin is scanned."""

    prefix = PREFIX

    def parseStreamServer(self, reactor, *args, **kwargs) -> SSL4ServerEndpoint:
        try:
            return _endpoint(reactor, *args, **kwargs)
        except ValueError as e:
            raise MutualTLSError(f"{PREFIX}: {e}; the form is {USAGE}") from None


def _endpoint(reactor, port=None, *extra, privateKey=None, certKey=None, caCerts=None,
              interface="", backlog="50", **unknown) -> SSL4ServerEndpoint:
    if unknown:
        raise ValueError(f"unknown keyword {', '.join(sorted(unknown))}")
    if extra:
        raise ValueError(f"only one port is taken, not also {':'.join(extra)}")
    if port is None or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"the port must be a number from 0 to 65535, not {port!r}")
    if not caCerts:
        raise ValueError("caCerts=CA.pem is required: the CA certificate(s) that signed the "
                         "client certificates to accept (without it this would be ssl:, "
                         "which lets any client in)")
    if not privateKey:
        raise ValueError("privateKey=KEY.pem is required: the door's own private key "
                         "(and its certificate, unless certKey= names another file)")
    if not backlog.isdigit():
        raise ValueError(f"backlog must be a number, not {backlog!r}")
    options = tls.server_options(tls.load_identity(certKey or privateKey, privateKey),
                                 tls.load_authorities(caCerts))
    return SSL4ServerEndpoint(reactor, int(port), options, backlog=int(backlog),
                              interface=interface)
