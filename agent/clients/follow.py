"""A task's output over server-sent events, copied as it comes, resumed after a dropped connection.

The agent numbers each chunk with the byte offset that follows it (`next`), so a
reader that reconnects with `stdout_offset` / `stderr_offset` set to the last
offsets it got neither loses nor repeats a byte. A follow that stays silent
for `idle_timeout` is reopened too: the agent is asked again rather than
trusted to be there, so a connection that died without a word cannot hang
the client forever. Only a run of failed attempts longer than `give_up_after`
ends the copy (Unreachable); an error answer (Refused: 404 for a purged task,
401, ...) ends it at once.
"""
from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Callable

from agent.clients.agentapi import ClientError, Unreachable
from agent.clients.sse import Event, EventParser

STREAMS = ("stdout", "stderr")
IDLE_TIMEOUT = 60.0
GIVE_UP_AFTER = 30.0
FIRST_BACKOFF, MAX_BACKOFF = 0.1, 2.0


def output_path(task_id: str) -> str:
    return f"/tasks/{task_id}/output"


class OutputFollower:
    """Copies one task's chosen streams to write(stream, text) until the output ends.

    open_stream(query) returns a response (readline(), headers, close()) or raises
    a ClientError; note(text) is told what the operator should know (dropped bytes).
    """

    def __init__(self, open_stream: Callable, write: Callable[[str, str], None],
                 streams: tuple[str, ...] = ("stdout",), follow: bool = True,
                 note: Callable[[str], None] = lambda text: None,
                 give_up_after: float = GIVE_UP_AFTER, sleep=time.sleep, clock=time.monotonic):
        self._open = open_stream
        self._write = write
        self._streams = streams
        self._follow = follow
        self._note = note
        self._give_up_after = give_up_after
        self._sleep, self._clock = sleep, clock
        self.offsets = {name: 0 for name in STREAMS}
        self.connections = 0

    def query(self) -> dict[str, str]:
        """The next request's query: the chosen streams, from where the last event left them."""
        query = {"stream": self._streams[0] if len(self._streams) == 1 else "both"}
        if self._follow:
            query["follow"] = "true"
        for name in self._streams:
            query[f"{name}_offset"] = str(self.offsets[name])
        return query

    def run(self) -> dict | None:
        """The end event's summary; None when not following and the task has not ended."""
        failures, failing_since = 0, None
        while True:
            try:
                response = self._open(self.query())
                self.connections += 1
                how, progressed, summary = self._copy(response)
            except Unreachable as e:
                how, progressed, summary, error = "unreachable", False, None, e
            if how == "end":
                return summary
            if how == "eof" and not self._follow:
                return None
            if progressed or how == "idle":
                failures, failing_since = 0, None
                continue
            now = self._clock()
            failing_since = now if failing_since is None else failing_since
            if now - failing_since >= self._give_up_after:
                why = str(error) if how == "unreachable" else "the agent kept closing the stream"
                raise Unreachable(f"{why}; gave up following after {self._give_up_after:g} s")
            self._sleep(min(FIRST_BACKOFF * 2 ** failures, MAX_BACKOFF))
            failures += 1

    def _copy(self, response) -> tuple[str, bool, dict | None]:
        """(how it ended: end, eof, dropped or idle; whether any event came; the end summary)."""
        parser, progressed = EventParser(), False
        try:
            self._start_at(response.headers)
            while True:
                try:
                    line = response.readline()
                except (socket.timeout, TimeoutError):
                    return "idle", progressed, None
                except (OSError, http.client.HTTPException):
                    return "dropped", progressed, None
                if not line:
                    return "eof", progressed, None
                event = parser.feed(line)
                if event is None:
                    continue
                progressed = True
                summary = self._handle(event)  # a failed write (a broken pipe) is no drop
                if summary is not None:
                    return "end", True, summary
        finally:
            response.close()

    def _start_at(self, headers) -> None:
        """X-Stdout-Offset and X-Stderr-Offset: later than asked when older bytes were dropped."""
        for name in self._streams:
            value = headers.get(f"X-{name.capitalize()}-Offset")
            if value is not None and value.isdigit():
                self.offsets[name] = max(self.offsets[name], int(value))

    def _handle(self, event: Event) -> dict | None:
        if event.name not in (*STREAMS, "dropped", "end"):
            return None
        try:
            data = json.loads(event.data)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ClientError(f"the agent sent a {event.name!r} event that is not a JSON object")
        if event.name == "end":
            return data
        if event.name == "dropped":
            self._note(f"{data.get('bytes')} bytes of {data.get('stream')} were dropped by the "
                       "agent before they could be read")
            return None
        try:
            text, next_offset = str(data["text"]), int(data["next"])
        except (KeyError, TypeError, ValueError):
            raise ClientError(f"the agent sent a {event.name!r} event without text and next") \
                from None
        self._write(event.name, text)
        self.offsets[event.name] = next_offset
        return None
