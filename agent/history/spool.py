"""Output spool files: each task's stdout and stderr, appended to disk as they arrive.

A stream lives in DIR/<stream>.<offset> segment files, each named by the
logical byte offset (bytes the task had written to that stream before it)
where it begins. Past the limit the oldest segments are deleted, so a stream
keeps its newest bytes (at most `limit`, at least `limit` minus one segment)
and the first segment's name says how many were dropped. Offsets stay valid
across drops, so a reader can resume where it stopped; names alone describe
a stream, so the files can be read after a restart without any other state.

Nothing is held in memory beyond the chunk at hand, and nothing is created
for a stream that stays silent.
"""
from __future__ import annotations

import errno
import os
from typing import Protocol

from twisted.logger import Logger

from agent.fdlimit import made_despite_a_hold

STREAMS = {1: "stdout", 2: "stderr"}
SEGMENTS_PER_LIMIT = 8

log = Logger()


class Watcher(Protocol):
    def output_arrived(self, fd: int) -> None: ...

    def output_ended(self) -> None: ...


class StreamWriter:
    """Appends one stream to segment files and deletes the oldest past the limit."""

    def __init__(self, directory: str | os.PathLike, name: str, limit: int):
        self._directory = directory
        self._name = name
        self._limit = limit
        self._segment_bytes = -(-limit // SEGMENTS_PER_LIMIT) or 1
        self._segments: list[int] = []  # start offsets on disk, oldest first
        self._fd: int | None = None
        self.total = 0
        self.broken: str | None = None

    @property
    def dropped(self) -> int:
        return self._segments[0] if self._segments else self.total

    @property
    def open_segment(self) -> int | None:
        """Start offset of the segment being written, so a reader at its end knows it is live."""
        return self._segments[-1] if self._fd is not None else None

    def append(self, data: bytes) -> None:
        if self._limit == 0:  # a stream counted, never kept
            self.total += len(data)
            return
        if len(data) > self._limit:
            self._skip(len(data) - self._limit)
            data = data[-self._limit:]
        view = memoryview(data)
        while view:
            if self.broken:
                self.total += len(view)
                return
            if self._fd is None or self.total >= self._segments[-1] + self._segment_bytes:
                self._start_segment()
                continue
            room = self._segments[-1] + self._segment_bytes - self.total
            piece = view[:room]
            try:
                _write_all(self._fd, piece)
            except OSError as e:
                self._give_up(e)
                continue
            self.total += len(piece)
            view = view[len(piece):]
        self._drop_oldest()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _skip(self, n: int) -> None:
        """Bytes that could never be kept: a gap, so the next byte starts a new segment."""
        self.close()
        self.total += n

    def _start_segment(self) -> None:
        self.close()
        try:
            os.makedirs(self._directory, mode=0o700, exist_ok=True)
            path = os.path.join(self._directory, f"{self._name}.{self.total}")
            self._fd = made_despite_a_hold(lambda: os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
        except OSError as e:
            self._give_up(e)
            return
        self._segments.append(self.total)

    def _drop_oldest(self) -> None:
        while len(self._segments) > 1 and self.total - self._segments[0] > self._limit:
            start = self._segments.pop(0)
            try:
                os.unlink(os.path.join(self._directory, f"{self._name}.{start}"))
            except FileNotFoundError:
                pass

    def _give_up(self, e: OSError) -> None:
        """A full or broken disk must not kill the task: keep counting, stop writing."""
        self.close()
        self.broken = f"{e.strerror or e}"
        log.error("cannot spool {name} to {dir}: {reason}; its further output is not kept",
                  name=self._name, dir=str(self._directory), reason=self.broken)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


class TaskOutput:
    """A task's output sink: spools each stream and tells watchers (followers) about it."""

    def __init__(self, directory: str | os.PathLike, limit: int):
        self.directory = directory
        self._limit = limit
        self.streams: dict[int, StreamWriter] = {}
        self._watchers: list[Watcher] = []
        self.ended = False

    def received(self, fd: int, data: bytes) -> None:
        writer = self.streams.get(fd)
        if writer is None:
            writer = self.streams[fd] = StreamWriter(self.directory, STREAMS[fd], self._limit)
        writer.append(data)
        for watcher in list(self._watchers):
            watcher.output_arrived(fd)

    def size(self, fd: int) -> tuple[int, int]:
        """(bytes written, bytes dropped) so far."""
        writer = self.streams.get(fd)
        return (0, 0) if writer is None else (writer.total, writer.dropped)

    def watch(self, watcher: Watcher) -> None:
        self._watchers.append(watcher)

    def unwatch(self, watcher: Watcher) -> None:
        if watcher in self._watchers:
            self._watchers.remove(watcher)

    def end(self) -> None:
        """The task is over: close the files and tell every watcher, once."""
        if self.ended:
            return
        self.ended = True
        for writer in self.streams.values():
            writer.close()
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            watcher.output_ended()


MAX_FILE_OFFSET = (1 << 63) - 1
"""The largest offset a file can have (off_t); a client may ask to read from any offset up to it."""


class StreamReader:
    """Reads one stream from a logical offset across its segments, a bounded chunk at a time.

    `live` is the task's TaskOutput while it runs: at the end of the segment
    being written there is nothing more yet, which it tells without a
    directory listing. When the writer deleted bytes before they were read,
    the reader jumps to the oldest kept byte and counts the gap in `skipped`.
    """

    def __init__(self, directory: str | os.PathLike, fd: int, offset: int = 0, live: TaskOutput | None = None):
        self._directory = directory
        self._fd_number = fd
        self._name = STREAMS[fd]
        self._live = live
        self.position = offset
        self.skipped = 0
        self._file: int | None = None
        self._file_start = 0

    def read(self, size: int) -> bytes:
        for _ in range(3):  # at most: end of a segment, a deleted gap, then the data
            if self._file is None and not self._open_segment():
                return b""
            at = self.position - self._file_start
            # a read may not reach past the largest file offset (EINVAL): nothing is there
            data = os.pread(self._file, min(size, MAX_FILE_OFFSET - at), at)
            if data:
                self.position += len(data)
                return data
            if self._at_live_end():
                return b""
            self.close()
            if not self._next_segment_exists():
                return b""
        return b""

    def close(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None

    def _at_live_end(self) -> bool:
        writer = None if self._live is None else self._live.streams.get(self._fd_number)
        return writer is not None and writer.open_segment == self._file_start

    def _next_segment_exists(self) -> bool:
        return any(start >= self.position for start in segment_starts(self._directory, self._name))

    def _open_segment(self) -> bool:
        if self._live is not None and self._fd_number not in self._live.streams:
            return False  # nothing written yet: no need to look at the disk
        starts = segment_starts(self._directory, self._name)
        if not starts:
            return False
        if self.position < starts[0]:
            self.skipped += starts[0] - self.position
            self.position = starts[0]
        start = max(s for s in starts if s <= self.position)
        later = [s for s in starts if s > start]
        try:
            self._file = os.open(os.path.join(self._directory, f"{self._name}.{start}"),
                                 os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False  # deleted since the listing; the next read looks again
        self._file_start = start
        end = start + os.fstat(self._file).st_size
        if later and self.position >= end:
            # a gap left by a chunk too big to keep whole: go on at the next segment
            self.close()
            self.skipped += later[0] - self.position
            self.position = later[0]
            return self._open_segment()
        return True


def segment_starts(directory: str | os.PathLike, name: str) -> list[int]:
    """Start offsets of a stream's segments on disk, oldest first."""
    try:
        entries = os.listdir(directory)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return []
        raise
    prefix = name + "."
    return sorted(int(entry[len(prefix):]) for entry in entries
                  if entry.startswith(prefix) and entry[len(prefix):].isdigit())


def size_on_disk(directory: str | os.PathLike, fd: int) -> tuple[int, int]:
    """(bytes written, bytes dropped) of a stream, from its files alone (after a crash)."""
    name = STREAMS[fd]
    starts = segment_starts(directory, name)
    if not starts:
        return 0, 0
    try:
        last = os.stat(os.path.join(directory, f"{name}.{starts[-1]}")).st_size
    except FileNotFoundError:
        last = 0
    return starts[-1] + last, starts[0]
