"""Bounds on what TCP clients can hold open: connections, and lines left unfinished.

Each connection costs a descriptor and up to --max-line bytes of a partial
request line; without a cap and a timeout, a client that opens connections
and sends a few bytes on each would hold them forever.
"""
from __future__ import annotations

from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from agent.doors.tcp.wire import encode_error

log = Logger()


def too_many_connections(limit: int) -> str:
    return f"too many connections (--max-connections {limit})"


def line_timed_out(seconds: float) -> str:
    return (f"request line not finished: nothing more arrived for {seconds:g} s "
            "(--line-timeout); connection closed")


class ConnectionCap:
    """Counts the door's open connections; past the limit a new one is refused (0 = no cap)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open = 0
        self._refused = 0

    def admits(self) -> bool:
        """Whether a new connection may be served; logs the first refusal of a spell."""
        if not self.limit or self.open < self.limit:
            return True
        if not self._refused:
            log.warn("{open} TCP connections are open (--max-connections {limit}): refusing new "
                     "ones until some close", open=self.open, limit=self.limit)
        self._refused += 1
        return False

    def joined(self) -> None:
        self.open += 1

    def left(self) -> None:
        self.open -= 1
        if self._refused and self.open < self.limit:
            log.info("TCP connections below --max-connections {limit} again; {n} refused "
                     "meanwhile", limit=self.limit, n=self._refused)
            self._refused = 0

    def refusal(self) -> "Refusal":
        return Refusal(encode_error(too_many_connections(self.limit)))


class Refusal(Protocol):
    """One error line, then close; nothing the client sends is read."""

    def __init__(self, line: bytes):
        self._line = line

    def connectionMade(self):
        self.transport.write(self._line)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes):
        """Ignored: nothing a refused client sends runs."""
