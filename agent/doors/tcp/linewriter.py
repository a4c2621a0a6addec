"""Whole lines out to one transport, in order, holding no more than the client takes.

The writer is the transport's streaming producer for the whole connection:
the transport pauses it when its buffer is full (the client does not read as
fast as results come) and resumes it once the buffer has drained. Lines wait
in the writer's queue meanwhile, so the transport itself holds about one
buffer (64 KiB) whatever the client does.

A line is made of pieces produced lazily: a result of hundreds of megabytes
is encoded a chunk of output at a time as the transport drains, and each
chunk is forgotten once encoded. Each queued line knows how many bytes of
output it still holds in memory (`held`), so the door can bound what waits
for slow clients across connections (agent.doors.tcp.backlog): a paused
writer's queued lines can be moved to a file (spilled) and are then read
back from it as the client takes them.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Iterator

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from agent._twisted_compat import socket_idle


class Line:
    """One queued line: its pieces, and how many bytes of memory it still holds."""

    __slots__ = ("pieces", "size", "taken", "counted", "spilling", "begun")

    def __init__(self, size: int):
        self.pieces: Iterator[bytes] = iter(())
        self.size = size
        self.taken = 0
        """Bytes of the held data consumed so far (sent, or written to a spill file)."""
        self.counted = size
        """What this line adds to its writer's and the backlog's `held` right now."""
        self.spilling = False
        self.begun = False
        """A piece of it is out: the client has started on it."""

    @classmethod
    def whole(cls, data: bytes) -> "Line":
        line = cls(len(data))
        line.pieces = line.count((data,))
        return line

    @classmethod
    def encoded(cls, encode: Callable[[Iterable[bytes]], Iterator[bytes]],
                chunks: Iterable[bytes], size: int) -> "Line":
        """encode(chunks) gives the line's pieces; size: the bytes the chunks hold in memory."""
        line = cls(size)
        line.pieces = encode(line.count(chunks))
        return line

    def count(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.taken += len(chunk)
            yield chunk

    @property
    def held(self) -> int:
        return max(self.size - self.taken, 0)


class Budget:
    """What a writer reports to; the door's Backlog, or nothing to report to."""

    def add(self, delta: int, relieve: bool = True) -> None:
        """relieve=False: do not act on it now (a spill's own result)."""

    def paused(self, writer: "LineWriter") -> None:
        pass

    def resumed(self, writer: "LineWriter") -> None:
        pass


@implementer(IPushProducer)
class LineWriter:
    def __init__(self, transport, budget: Budget | None = None,
                 congested: Callable[[bool], None] | None = None):
        """budget: told of every change in the bytes held and of every pause and resume.
        congested(bool): the client has stopped taking results while more are queued
        (True), or takes them again (False)."""
        self._transport = transport
        self._budget = budget or Budget()
        self._on_congested = congested or _unheard
        self._queue: deque[Line] = deque()
        self._paused = False
        self._congested = False
        self._stopped = False
        self._closing = False
        self.held = 0
        """Bytes of output the queued lines hold in memory (not in a spill file)."""
        transport.registerProducer(self, True)

    @property
    def idle(self) -> bool:
        """Nothing is queued: a write now goes straight to the transport."""
        return not self._queue

    @property
    def paused(self) -> bool:
        return self._paused

    def write(self, data: bytes) -> None:
        """One whole line; it waits behind any line still queued."""
        if not self._queue and not self._paused and not self._stopped and not self._closing:
            send_now(self._transport, data)  # the common case: a client that keeps up
        else:
            self.queue(Line.whole(data))

    def queue(self, line: Line) -> None:
        """A line to send after those queued; its pieces are made as the transport drains."""
        if self._stopped or self._closing:
            return
        self._queue.append(line)
        self.held += line.counted
        self._budget.add(line.counted)
        self._pump()

    def close(self) -> None:
        """Lose the connection once every queued line is out."""
        self._closing = True
        self._pump()

    def abandon(self) -> None:
        """Drop what is queued and lose the connection now (the client cannot take it)."""
        self._closing = True
        self._drop()
        self._finish()

    # -- IPushProducer, driven by the transport

    def pauseProducing(self) -> None:
        """The transport's buffer is full: the client is behind."""
        if not self._paused:
            self._paused = True
            self._budget.paused(self)
            self._check_congestion()

    def resumeProducing(self) -> None:
        """The transport has sent what it had: give it more."""
        if self._paused:
            self._paused = False
            self._budget.resumed(self)
        self._pump()

    def stopProducing(self) -> None:
        """The connection is gone: drop what is queued (and the output it holds)."""
        self._stopped = True
        self._drop()
        self._on_congested = _unheard  # let go of the protocol: no reference cycle outlives it

    # -- spilling, for the backlog

    def lines_to_spill(self) -> list[Line]:
        """The queued lines still in memory (always the queue's tail), marked as spilling:
        the caller now owns their pieces until it calls spilled()."""
        lines = [line for line in self._queue if not line.spilling and line.held]
        if lines:
            first = self._queue.index(lines[0])
            lines = list(self._queue)[first:]
            for line in lines:
                line.spilling = True
        return lines

    def spilled(self, lines: list[Line], replacement: Line | None) -> None:
        """The lines' remaining pieces are now replacement's (None: the connection is gone)."""
        for line in lines:
            self._release(line)
        if self._stopped or replacement is None:
            if replacement is not None:
                replacement.pieces.close()
            return
        gone = {id(line) for line in lines}
        at = next(i for i, line in enumerate(self._queue) if line is lines[0])
        kept = [line for line in self._queue if id(line) not in gone]
        kept.insert(at, replacement)
        self._queue = deque(kept)
        self.held += replacement.counted  # what the disk refused: no new spill for it now
        self._budget.add(replacement.counted, relieve=False)
        self._pump()

    # -- helpers

    def _pump(self) -> None:
        """Pieces to the transport until it pauses us, or the head line is being spilled."""
        while self._queue and not self._paused and not self._stopped:
            line = self._queue[0]
            if line.spilling:
                break
            piece = next(line.pieces, None)
            if piece is None:
                self._queue.popleft()
                self._release(line)
                continue
            self._account(line)
            line.begun = True
            if piece:  # an empty write would never bring the transport back for more
                send_now(self._transport, piece)  # may pause us (pauseProducing)
        self._check_congestion()
        if self._closing and not self._queue and not self._stopped:
            self._finish()

    def _account(self, line: Line) -> None:
        delta = line.held - line.counted
        if delta:
            line.counted += delta
            self.held += delta
            self._budget.add(delta)

    def _release(self, line: Line) -> None:
        """The line holds nothing more here: sent, spilled or dropped."""
        if line.counted:
            self.held -= line.counted
            self._budget.add(-line.counted)
            line.counted = 0

    def _check_congestion(self) -> None:
        """Congested: the transport is full and a whole line waits behind what it holds."""
        waiting = len(self._queue) - (1 if self._queue and self._queue[0].begun else 0)
        congested = self._paused and waiting > 0 and not self._stopped
        if congested != self._congested:
            self._congested = congested
            self._on_congested(congested)

    def _drop(self) -> None:
        for line in self._queue:
            if not line.spilling:  # a spilling line's pieces are the spill's until it is done
                close = getattr(line.pieces, "close", None)
                if close is not None:
                    close()
                self._release(line)
        self._queue.clear()
        if self._paused:
            self._paused = False
            self._budget.resumed(self)
        self._check_congestion()

    def _finish(self) -> None:
        """Unregister first: a TLS transport closes only once its producer has gone."""
        if self._stopped:
            return
        self._stopped = True
        self._transport.unregisterProducer()
        self._transport.loseConnection()


def send_now(transport, data: bytes) -> None:
    """transport.write(data), but what an idle socket takes is sent at once.

    A transport's write only buffers: the bytes go out on the reactor's next
    turn, after everything else this turn does (the task's log line, the check
    that its process group is empty, the next tasks' spawns), and each result
    costs two more epoll_ctl calls and a turn of the loop. A client waiting for
    its result should not wait for that. What the socket does not take, or any
    transport that is not a plain idle socket (TLS, a test's), is written as before.
    """
    if socket_idle(transport):
        try:
            sent = transport.getHandle().send(data)
        except OSError:
            sent = 0  # full, or broken: the transport's own write finds out which
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


def _unheard(congested: bool) -> None:
    """Nobody listens for congestion."""
