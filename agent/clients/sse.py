"""Server-sent events, parsed line by line: what `GET /tasks/ID/output` sends to
`Accept: text/event-stream` (standard library only: agentctl imports it).

Only the parts of the format the agent uses and a robust reader needs: `event`,
`data` (several lines joined by newlines), `id`, comments and unknown fields
ignored, an event dispatched at the blank line that ends it. A stream cut in
the middle of an event yields nothing for it, so a reader that resumes from the
last event it got neither loses nor repeats a chunk.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Event:
    name: str
    data: str
    id: str | None = None


class EventParser:
    """Feed it the lines of one response; it returns each event once its blank line arrives."""

    def __init__(self):
        self._name, self._data, self._id = "", [], None

    def feed(self, line: bytes | str) -> Event | None:
        if isinstance(line, bytes):
            line = line.decode("utf-8", "replace")
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            self._name = value
        elif field == "data":
            self._data.append(value)
        elif field == "id":
            self._id = value
        return None

    def _dispatch(self) -> Event | None:
        name, data, event_id = self._name, self._data, self._id
        self._name, self._data, self._id = "", [], None
        if not data and not name:
            return None
        return Event(name or "message", "\n".join(data), event_id)


def events(lines) -> list[Event]:
    """Every complete event in an iterable of lines (a convenience for tests and short answers)."""
    parser = EventParser()
    return [event for line in lines if (event := parser.feed(line)) is not None]
