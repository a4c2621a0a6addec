"""Answering a repeated request from the history: the task it names is never run twice.

A request whose id (its idempotency key) the agent already knows gets the
existing task's result, rebuilt from its record and its spooled output.
"""
from __future__ import annotations

from typing import Iterator

from agent.core.outcome import Ending, Outcome

CHUNK = 1 << 20

_ENDINGS = {ending.value: ending for ending in Ending}


def used_for_another_command(key: str, command) -> str:
    """The error for a key reused with a different argv: running either would be a guess."""
    return (f"id {key!r} was already used for another command ({list(command)!r}); "
            "an id names one task: use a new id to run a different command")


def recorded_outcome(record) -> Outcome:
    """The Outcome a finished task's record describes, as the doors encode it."""
    duration_ms = record.duration_ms
    if duration_ms is None and record.started_at is not None:
        # lost: it ran until the agent died, somewhere before finished_at
        duration_ms = max(0.0, ((record.finished_at or record.started_at) - record.started_at) * 1000)
    return Outcome(_ENDINGS.get(record.reason or "", Ending.EXITED if record.state in
                                ("succeeded", "failed") else Ending.CANCELLED),
                   record.exit_code if record.exit_code is not None else -1,
                   record.error or "", record.signal, record.pid, record.started_at, duration_ms)


def spooled_stdout(history, record) -> tuple[Iterator[bytes], int]:
    """(the stdout the history kept, read lazily a chunk at a time; how many bytes it did not keep).

    TCP tasks keep none unless the agent runs with --keep-tcp-output."""
    return _read_all(history.reader(record.id, 1), record.stdout_bytes), record.stdout_dropped


def _read_all(reader, end: int) -> Iterator[bytes]:
    try:
        while reader.position < end:
            data = reader.read(min(CHUNK, end - reader.position))
            if not data:
                break
            yield data
    finally:
        reader.close()
