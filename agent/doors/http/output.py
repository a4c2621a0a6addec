"""GET /tasks/{id}/output: a task's output from an offset, as text or server-sent events,
and, with follow=true, each new chunk as the task writes it until the task ends.

Output is read from the spool files a bounded chunk at a time and only while
the client keeps up (the response is a push producer the transport pauses),
so neither a fast task nor a slow client makes the agent hold output in memory.
"""
from __future__ import annotations

import codecs
import json
from typing import Callable

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from agent._twisted_compat import client_gone
from agent.history.spool import STREAMS, StreamReader, TaskOutput
from agent.history.store import Store, TaskRecord
from agent.doors.http.errors import BadRequest, NotFound
from agent.doors.http.query import choice_arg, int_arg
from agent.doors.http.router import STREAMING

log = Logger()

CHUNK = 64 * 1024
BURST = 16
"""Chunks written in one go before giving other connections a turn."""

STREAM_CHOICES = {"stdout": (1,), "stderr": (2,), "both": (1, 2)}
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


class PlainText:
    content_type = b"text/plain; charset=utf-8"

    def chunk(self, fd: int, data: bytes, next_offset: int) -> bytes:
        return data

    def skipped(self, fd: int, count: int) -> bytes:
        return b""

    def end(self, record: TaskRecord | None) -> bytes:
        return b""


class ServerSentEvents:
    """One event per chunk, named by its stream; its data is JSON, so any byte survives.

    `next` in each event is the offset to pass as ?offset= to resume that stream;
    the event's id carries both streams' offsets ("stdout:N,stderr:M"), so an
    EventSource that reconnects (sending Last-Event-ID) resumes both exactly.
    """

    content_type = b"text/event-stream"

    def __init__(self, offsets: dict[int, int] | None = None):
        self._decoders = {fd: codecs.getincrementaldecoder("utf-8")("replace") for fd in STREAMS}
        self._next = {fd: (offsets or {}).get(fd, 0) for fd in STREAMS}

    def chunk(self, fd: int, data: bytes, next_offset: int) -> bytes:
        self._next[fd] = next_offset
        event_id = ",".join(f"{STREAMS[n]}:{offset}" for n, offset in self._next.items())
        return _event(STREAMS[fd], {"text": self._decoders[fd].decode(data), "next": next_offset},
                      event_id)

    def skipped(self, fd: int, count: int) -> bytes:
        return _event("dropped", {"stream": STREAMS[fd], "bytes": count})

    def end(self, record: TaskRecord | None) -> bytes:
        """A character cut short at the end, then the end event if the task has ended."""
        tails = b"".join(_event(STREAMS[fd], {"text": text, "next": self._next[fd]})
                         for fd, decoder in self._decoders.items()
                         if (text := decoder.decode(b"", final=True)))
        if record is None or not record.ended:
            return tails
        return tails + _event("end", end_summary(record))


def end_summary(record: TaskRecord) -> dict:
    """What the SSE end event says: the state, how and why the task ended.

    reason is one of agent.core.outcome.REASONS (exited, signalled, timeout, cancelled,
    output_cap, start_failed, lost); signal is set only when a signal the agent
    did not send ended it.
    """
    reason, signal = record.why_it_ended
    return {"state": record.state, "reason": reason, "exit_code": record.exit_code,
            "signal": signal, "duration_ms": record.duration_ms, "error": record.error or ""}


def _event(name: str, payload: dict, event_id: str | None = None) -> bytes:
    head = b"" if event_id is None else b"id: %s\n" % event_id.encode()
    return head + b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(payload).encode())


@implementer(IPushProducer)
class OutputStreamer:
    """Copies spool readers to a response, pausing when the client does, following `live`.

    limits caps each reader at an offset (a snapshot of what existed when
    asked); finale gives the bytes to end with (the SSE end event).
    """

    def __init__(self, request, readers: dict[int, StreamReader], live: TaskOutput | None = None,
                 form=None, limits: dict[int, int] | None = None,
                 finale: Callable[[], Deferred] | None = None, clock=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self._request = request
        self._readers = readers
        self._live = live
        self._form = form or PlainText()
        self._limits = limits or {}
        self._finale = finale
        self._clock = clock
        self._paused = self._busy = self._done = False
        self._later = None

    def start(self) -> None:
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addBoth(self._client_gone)
        if self._live is not None:
            self._live.watch(self)
        self._pump()

    # -- IPushProducer: the transport's pace

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        self._pump()

    def stopProducing(self):
        self._stop()

    # -- spool watcher: the task's pace

    def output_arrived(self, fd: int) -> None:
        self._pump()

    def output_ended(self) -> None:
        self._live = None
        self._pump()

    # -- copying

    def _pump(self) -> None:
        if self._busy or self._paused or self._done:
            return
        self._busy = True
        try:
            for _ in range(BURST):
                if self._paused or self._done:
                    return
                if not self._copy_one_round():
                    if self._live is None:
                        self._finish()
                    return
            if self._later is None or not self._later.active():
                self._later = self._clock.callLater(0, self._pump)
        finally:
            self._busy = False

    def _copy_one_round(self) -> bool:
        """One chunk from each stream that has one; False when none had any."""
        progressed = False
        for fd, reader in self._readers.items():
            size = CHUNK
            if fd in self._limits:
                size = min(size, self._limits[fd] - reader.position)
                if size <= 0:
                    continue
            skipped = reader.skipped
            data = reader.read(size)
            if reader.skipped != skipped:
                self._write(self._form.skipped(fd, reader.skipped - skipped))
            if data:
                self._write(self._form.chunk(fd, data, reader.position))
                progressed = True
        return progressed

    def _write(self, data: bytes) -> None:
        if data and not self._done:
            self._request.write(data)

    def _finish(self) -> None:
        self._stop()
        tail = maybeDeferred(self._finale) if self._finale else succeed(b"")
        tail.addCallback(self._write_tail_and_close)
        tail.addErrback(lambda f: log.failure("ending an output stream", f))

    def _write_tail_and_close(self, tail: bytes) -> None:
        if (self._request is None or client_gone(self._request)
                or self._request.finished):
            return
        if tail:
            self._request.write(tail)
        self._request.unregisterProducer()
        self._request.finish()

    def _client_gone(self, _) -> None:
        """The response is over: finished, or the client left. A request that
        lost its client still names this streamer as its producer, so drop the
        way back and leave no reference cycle for the GC."""
        self._stop()
        self._request = None

    def _stop(self) -> None:
        if self._done:
            return
        self._done = True
        if self._later is not None and self._later.active():
            self._later.cancel()
        if self._live is not None:
            self._live.unwatch(self)
            self._live = None
        for reader in self._readers.values():
            reader.close()


class OutputEndpoint:
    def __init__(self, store: Store, clock=None):
        self._store = store
        self._clock = clock

    def get(self, request, id: str):
        fds = STREAM_CHOICES[choice_arg(request, "stream", tuple(STREAM_CHOICES), "stdout")]
        offsets = _offsets(request)
        follow = _follow(request)
        form = ServerSentEvents(offsets) if _wants_events(request) else PlainText()
        found = self._store.get(id)
        found.addCallback(self._stream, request, id, fds, offsets, follow, form)
        return found

    def _stream(self, record: TaskRecord | None, request, task_id, fds, offsets, follow, form):
        if record is None:
            raise NotFound(f"no task with id {task_id!r}")
        live = self._store.live_output(task_id) if follow else None
        readers = {fd: self._store.reader(task_id, fd, offsets[fd]) for fd in fds}
        limits = None if follow else {1: record.stdout_bytes, 2: record.stderr_bytes}
        request.setHeader(b"Content-Type", form.content_type)
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Task-State", record.state.encode())
        for fd in fds:
            dropped = record.stdout_dropped if fd == 1 else record.stderr_dropped
            name = STREAMS[fd].capitalize().encode()
            request.setHeader(b"X-%s-Dropped" % name, b"%d" % dropped)
            # where this response starts: bytes before the oldest kept one are gone
            request.setHeader(b"X-%s-Offset" % name, b"%d" % max(offsets[fd], dropped))
        OutputStreamer(request, readers, live, form, limits,
                       finale=lambda: self._store.get(task_id).addCallback(form.end),
                       clock=self._clock).start()
        return STREAMING


MAX_OFFSET = (1 << 63) - 1
"""The largest offset a file (or the history's integers) can hold."""


def _offsets(request) -> dict[int, int]:
    """Where each stream starts: ?stdout_offset= / ?stderr_offset=, else ?offset=, else the
    offsets in an EventSource's Last-Event-ID (it sends one when it reconnects), else 0."""
    resumed = _last_event_offsets(request)
    common = int_arg(request, "offset", -1, low=0, high=MAX_OFFSET)
    return {fd: int_arg(request, f"{name}_offset",
                        common if common >= 0 else resumed.get(fd, 0), low=0, high=MAX_OFFSET)
            for fd, name in STREAMS.items()}


def _last_event_offsets(request) -> dict[int, int]:
    raw = (request.getHeader(b"last-event-id") or b"").decode("ascii", "replace")
    fds = {name: fd for fd, name in STREAMS.items()}
    offsets = {}
    for part in raw.split(","):
        name, _, value = part.strip().partition(":")
        if name in fds and value.isascii() and value.isdigit():
            if int(value) > MAX_OFFSET:
                raise BadRequest(f"Last-Event-ID: {name} offset must be at most {MAX_OFFSET}")
            offsets[fds[name]] = int(value)
    return offsets


def _follow(request) -> bool:
    return choice_arg(request, "follow", TRUE + FALSE, "false") in TRUE


def _wants_events(request) -> bool:
    return b"text/event-stream" in (request.getHeader(b"accept") or b"")
