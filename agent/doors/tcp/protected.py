"""Protected mode: a TCP door without client authentication answers only its own host.

The TCP task protocol has no login: whoever reaches the port runs commands as
the agent's user. Bound to loopback (the default), only local users reach it.
An operator who binds it wider without client authentication (mTLS) most
likely did not mean "anyone on the network may run anything", so, as Redis
does, the door then answers only loopback peers and tells the others how to
enable authentication, unless the operator says --protected-mode no.
"""
from __future__ import annotations

import ipaddress

from twisted.internet.protocol import Protocol
from twisted.logger import Logger

log = Logger()

REFUSAL = ("protected mode: this agent's TCP door has no client authentication, so it answers "
           "only clients on its own host. To serve other hosts, give the door client "
           "certificates (an mtls: endpoint for --listen), or, if every host that can reach "
           "this port may run any command as the agent's user, start the agent with "
           "--protected-mode no")


def is_local(address) -> bool:
    """True for a loopback peer or a Unix socket (whose file mode decides who connects)."""
    host = getattr(address, "host", None)
    if host is None:
        return True  # UNIXAddress and the like: not reachable from another host
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class Refusal(Protocol):
    """Says why in one result line (so a scheduler's log shows it) and closes."""

    def __init__(self, line: bytes):
        self._line = line

    def connectionMade(self):
        peer = self.transport.getPeer()
        log.warn("protected mode: refused {peer}, which is not on this host (enable client "
                 "authentication, or --protected-mode no)",
                 peer=f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}")
        self.transport.write(self._line)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes):
        """Nothing a refused peer sends is read."""


def starting_note(host: str, protected: bool) -> str | None:
    """The warning to log once the door listens on host; None on loopback."""
    if is_local(_Address(host)):
        return None
    if protected:
        return (f"protected mode: the TCP door listens on {host}, beyond this host, with "
                "no client authentication: it answers only clients on this host. Enable client "
                "certificates (mtls:) or start with --protected-mode no to serve others")
    return (f"protected mode is off: anyone who can reach {host} on the TCP door can run any "
            "command as the agent's user")


class _Address:
    def __init__(self, host: str):
        self.host = host
