"""Answering a repeated request from the history: the task it names is never run twice.

A request whose id (its idempotency key) the agent already knows gets the
existing task's result, rebuilt from its record (TaskRecord.outcome) and its
spooled output, read here a chunk at a time.
"""
from __future__ import annotations

from typing import Iterator

CHUNK = 1 << 20


def spooled_stdout(history, record) -> tuple[Iterator[bytes], int]:
    """(the stdout the history kept, read lazily a chunk at a time; how many bytes it did not keep).

    TCP tasks without an id keep none unless the agent runs with --keep-tcp-output."""
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
