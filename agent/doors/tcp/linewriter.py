"""Whole lines out to one transport, in order, a large line pulled piece by piece.

A result line can be hundreds of megabytes. Written at once, it would sit in
the transport's buffer next to the output it was made from (and Twisted
joins its buffered pieces into one bytes object before sending). As a pull
producer the writer makes the next piece only when the transport has sent
the last, so the line costs one piece of memory on top of the output, and
lines finished meanwhile wait their turn instead of landing inside it.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

from twisted.internet.interfaces import IPullProducer
from zope.interface import implementer


@implementer(IPullProducer)
class LineWriter:
    def __init__(self, transport):
        self._transport = transport
        self._queue: deque[Iterator[bytes]] = deque()
        self._stopped = False

    @property
    def idle(self) -> bool:
        """Nothing is being streamed: a write now goes straight to the transport."""
        return not self._queue

    def write(self, line: bytes) -> None:
        """One whole line; it waits behind any line still being streamed."""
        if self._stopped:
            return
        if self._queue:
            self._queue.append(iter((line,)))
        else:
            self._transport.write(line)

    def stream(self, pieces: Iterable[bytes]) -> None:
        """One line given as pieces, made lazily as the transport drains."""
        if self._stopped:
            return
        self._queue.append(iter(pieces))
        if len(self._queue) == 1:
            self._transport.registerProducer(self, False)  # calls resumeProducing

    def resumeProducing(self) -> None:
        """The transport has sent everything: give it the next piece."""
        while self._queue:
            piece = next(self._queue[0], None)
            if piece is None:
                self._queue.popleft()
            elif piece:  # an empty write would never bring the transport back for more
                self._transport.write(piece)
                return
        self._transport.unregisterProducer()

    def stopProducing(self) -> None:
        """The connection is gone: drop what is queued (and the output it holds)."""
        self._stopped = True
        self._queue.clear()
