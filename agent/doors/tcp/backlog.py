"""The results waiting for TCP clients that do not take them, bounded in total.

A finished task's result waits in its connection's LineWriter until the
client reads it. A client that never reads would otherwise keep every result
it asked for in the agent's memory (four such clients of 200 MiB tasks took
the agent from 215 to 874 MiB). The Backlog adds up what every writer holds;
past --max-pending-output it moves the queued results of the writers whose
clients have been behind the longest into anonymous files in the data dir
(written on a thread, read back piece by piece as the client takes them)
until the total is under the bound again.
"""
from __future__ import annotations

import os
import tempfile
from itertools import chain
from typing import Callable, Iterator

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from agent.doors.tcp.linewriter import Budget, Line, LineWriter

log = Logger()

WRITE_BATCH = 1 << 20
"""Bytes gathered before each write to a spill file: 256 writes for 256 MiB, not 32,000."""

READ_PIECE = 1 << 16
"""Bytes read back from a spill file for each piece handed to the transport."""


class Backlog(Budget):
    """Every writer's held bytes, and what to do when their sum passes the limit."""

    def __init__(self, limit: int, spill: "Spill | None"):
        """limit: bytes (0 = no bound); spill: where results go past it (None: nowhere)."""
        self.limit = limit
        self._spill = spill
        self.held = 0
        """Bytes of output the writers' queues hold in memory."""
        self.leaving = 0
        """Of those, bytes being written to spill files right now."""
        self._behind: dict[LineWriter, None] = {}
        """Paused writers, the one paused longest first."""

    def add(self, delta: int, relieve: bool = True) -> None:
        self.held += delta
        if delta > 0 and relieve:
            self.relieve()

    def paused(self, writer: LineWriter) -> None:
        self._behind[writer] = None
        self.relieve()

    def resumed(self, writer: LineWriter) -> None:
        self._behind.pop(writer, None)

    def relieve(self) -> None:
        """Spill the queues of the clients behind the longest until the rest fits the limit.

        Only a paused writer's lines are spilled: one whose transport has room
        is handing its lines over right now, and if its client falls behind
        the transport pauses it, which brings it here."""
        if not self.limit or self._spill is None:
            return
        for writer in list(self._behind):
            if self.held - self.leaving <= self.limit:
                return
            lines = writer.lines_to_spill()
            if lines:
                moved = sum(line.counted for line in lines)
                self.leaving += moved
                self._spill.spill(lines).addBoth(self._spilled, writer, lines, moved)

    def _spilled(self, replacement, writer: LineWriter, lines: list[Line], moved: int) -> None:
        self.leaving -= moved
        if isinstance(replacement, Failure):
            log.failure("spilling results for a slow TCP client; closing its connection",
                        replacement)
            writer.spilled(lines, None)
            writer.abandon()
            return
        writer.spilled(lines, replacement)


class Spill:
    """Moves lines into anonymous files (O_TMPFILE: nothing is left behind, even
    after a crash) in a directory, on a thread, so a slow disk never stalls the reactor."""

    def __init__(self, directory: str, in_thread: Callable[..., Deferred]):
        """in_thread(f, *args): a Deferred of f(*args) run off the reactor thread
        (deferToThreadPool in the agent; a plain call in tests)."""
        self._directory = directory
        self._in_thread = in_thread
        self._failing = False

    def spill(self, lines: list[Line]) -> Deferred[Line]:
        """A Deferred of one line whose pieces are all of lines' remaining pieces, in order."""
        pieces = chain.from_iterable(line.pieces for line in lines)
        return self._in_thread(_write_out, self._directory, pieces).addCallback(
            self._to_line, lines)

    def _to_line(self, written: "_Written", lines: list[Line]) -> Line:
        if written.error is None:
            self._failing = False
            line = Line(0)  # in a file: no memory held
            line.pieces = _ReadBack(written.file, written.length)
            return line
        if not self._failing:
            log.error("cannot spill results waiting for slow TCP clients into {dir}: {error}; "
                      "they stay in memory", dir=self._directory, error=written.error)
        self._failing = True
        line = Line(len(written.unwritten) + sum(line.held for line in lines))
        line.pieces = _Chained(_ReadBack(written.file, written.length), iter((written.unwritten,)),
                               written.rest)
        return line


class _Written:
    """What one spill wrote: the file and its length; on an error, what it could not write."""

    def __init__(self):
        self.file = None
        self.length = 0
        self.unwritten = b""
        self.rest: Iterator[bytes] = iter(())
        self.error: OSError | None = None


def _write_out(directory: str, pieces: Iterator[bytes]) -> _Written:
    """On the spill thread: pieces into a new anonymous file, a batch at a time.
    If the disk refuses (full, gone), what was not written stays in memory."""
    written = _Written()
    try:
        written.file = tempfile.TemporaryFile(dir=directory)
        for batch in _batches(pieces):
            written.unwritten = batch
            _write_all(written)
    except OSError as e:
        written.error = e
        written.rest = pieces
    return written


def _batches(pieces: Iterator[bytes]) -> Iterator[bytes]:
    batch: list[bytes] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece)
        if size >= WRITE_BATCH:
            yield b"".join(batch)
            batch, size = [], 0
    if batch:
        yield b"".join(batch)


def _write_all(written: _Written) -> None:
    """Write written.unwritten, keeping it exact (what is left) if the disk refuses midway."""
    while written.unwritten:
        n = os.write(written.file.fileno(), written.unwritten)
        written.length += n
        written.unwritten = written.unwritten[n:]


class _Chained:
    """Iterators one after the other; close() closes each that can be."""

    def __init__(self, *iterators: Iterator[bytes]):
        self._iterators = list(iterators)

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        while self._iterators:
            piece = next(self._iterators[0], None)
            if piece is not None:
                return piece
            self._iterators.pop(0)
        raise StopIteration

    def close(self) -> None:
        for iterator in self._iterators:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
        self._iterators = []


class _ReadBack:
    """A spill file's first length bytes, a piece at a time; the file is closed at the
    end or by close() (the connection went away), whether reading began or not."""

    def __init__(self, file, length: int):
        self._file = file
        self._length = length
        self._position = 0

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        if self._file is None:
            raise StopIteration
        left = self._length - self._position
        data = os.pread(self._file.fileno(), min(READ_PIECE, left), self._position) if left else b""
        if not data:
            self.close()
            raise StopIteration
        self._position += len(data)
        return data

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
