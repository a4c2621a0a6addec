"""A TCP task's stdout, kept for its result line while the task runs.

A small output is kept as it came and encoded whole with the result, which
is quickest. Past ESCAPE_ABOVE the output is escaped for the JSON string as
each chunk arrives, while the task is still writing the next one: the agent
otherwise waits on the pipe during the task and does all the escaping after
it, while the client waits (200 MiB: a third of a second). The escaped
pieces are then the line's body as they stand, handed out once, each
forgotten as it is taken so a large result's memory goes as it is sent.
"""
from __future__ import annotations

from typing import Iterator

from agent.doors.tcp.wire import OutputEscaper

ESCAPE_ABOVE = 256 << 10
"""Bytes of stdout past which it is escaped as it arrives, and its result
line is sent piece by piece (agent.doors.tcp.linewriter)."""


class ResultOutput:
    """The engine's sink for a TCP task: stdout for the result, stderr only counted."""

    def __init__(self, escape_above: int = ESCAPE_ABOVE):
        self.sizes = {1: 0, 2: 0}
        self._escape_above = escape_above
        self._raw: list[bytes] = []
        self._escaper: OutputEscaper | None = None
        self._escaped: list[bytes] = []
        self.held = 0
        """Bytes of output (raw or escaped) kept in memory now."""

    @property
    def escaped(self) -> bool:
        """The output is large: its result is sent in pieces (see pieces)."""
        return self._escaper is not None

    def received(self, fd: int, data: bytes) -> None:
        self.sizes[fd] = self.sizes.get(fd, 0) + len(data)
        if fd != 1:
            return
        if self._escaper is not None:
            self._keep(self._escaper.escape(data))
            return
        self._raw.append(data)
        self.held += len(data)
        if self.sizes[1] > self._escape_above:
            self._escaper = OutputEscaper()
            raw, self._raw, self.held = self._raw, [], 0
            for chunk in raw:
                self._keep(self._escaper.escape(chunk))

    def text(self) -> str:
        """A small output decoded as UTF-8, invalid bytes replaced, so JSON stays valid."""
        return b"".join(self._raw).decode("utf-8", "replace")

    def pieces(self) -> Iterator[bytes]:
        """A large output's body of the JSON string, once: each piece is forgotten as it
        is handed out, so its memory is given back while the result is being sent."""
        self._keep(self._escaper.finish())
        escaped, self._escaped = self._escaped, []
        escaped.reverse()
        while escaped:
            piece = escaped.pop()
            self.held -= len(piece)
            yield piece

    def _keep(self, piece: bytes) -> None:
        if piece:
            self._escaped.append(piece)
            self.held += len(piece)
