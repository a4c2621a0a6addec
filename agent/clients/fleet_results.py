"""agent-scheduler --fleet's result lines: a fleet task's record in the TCP door's format.

A script that reads `agent-scheduler --agent` results reads these the same way: command,
executed_at, duration_ms, exit_code, output, error, id. The fleet adds its state, the
attempt that reported, where it ran (node_id, local_task_id: the whole output is
GET /tasks/{local_task_id}/output on that node's HTTP door), named as in the HTTP door's
fleet records, and output_dropped when the record's 64 KiB tail of stdout lacks the start
of it (the field a replayed TCP result uses for the same thing).
Pure functions, no I/O.
"""
from __future__ import annotations

import json
from typing import Any

from agent.fleet.records import FleetTask


def result_fields(task: FleetTask) -> dict[str, Any]:
    """The result of an ended fleet task, as the TCP door would word it.

    A task that never ran a process (cancelled while queued, could not start, lost)
    has no executed_at, duration_ms or output, as a TCP result of a task that never
    started, so it cannot be mistaken for a program that ran and failed.
    """
    ran = task.duration_ms is not None and task.started_at is not None
    fields: dict[str, Any] = {"command": list(task.command)}
    if ran:
        fields["executed_at"] = int(task.started_at.timestamp())
        fields["duration_ms"] = round(task.duration_ms, 3)
    fields["exit_code"] = -1 if task.exit_code is None else task.exit_code
    output, dropped = stdout_of(task)
    if ran:
        fields["output"] = output
    fields["error"] = task.error or ""
    fields["id"] = task.key
    if ran and dropped:
        fields["output_dropped"] = dropped
    fields["state"] = task.state
    fields["attempt"] = task.attempt
    if task.node_id is not None:
        fields["node_id"] = task.node_id
    if task.local_task_id is not None:
        fields["local_task_id"] = task.local_task_id
    return fields


def conflict_fields(key: str, command: tuple[str, ...], message: str) -> dict[str, Any]:
    """The result of a task the fleet refused: its key names a task with another command
    (which is not shown: it may be someone else's)."""
    return {"command": list(command), "exit_code": -1, "error": message, "id": key,
            "state": "refused"}


def encode(fields: dict[str, Any]) -> bytes:
    """One line, with its newline, spaced as the TCP door writes them."""
    return json.dumps(fields, ensure_ascii=False, separators=(", ", ": ")).encode("utf-8") + b"\n"


def stdout_of(task: FleetTask) -> tuple[str, int]:
    """The record's tail of stdout as text (invalid UTF-8 replaced), and how many of
    stdout's first bytes it lacks. A tail that was cut may begin inside a character:
    those leftover bytes are dropped too (and counted) rather than shown as U+FFFD."""
    tail = task.stdout_tail or b""
    dropped = max(0, (task.stdout_bytes or 0) - len(tail))
    if dropped:
        start = 0
        while start < min(3, len(tail)) and tail[start] & 0xC0 == 0x80:
            start += 1
        tail, dropped = tail[start:], dropped + start
    return tail.decode("utf-8", "replace"), dropped
