"""Values read from the fleet's tables: what a fleet task and a node are, outside SQL."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

TAIL_BYTES = 64 << 10
"""Most bytes of each stream's end a fleet record keeps; the whole output stays on the node."""

ENDED = ("finished", "cancelled", "lost")
STATES = ("queued", "running", *ENDED)


@dataclass(frozen=True)
class Submission:
    """One task for the fleet: its key (fleet-wide idempotency), argv, timeout in seconds
    (None = none), limits and the node labels it needs."""

    key: str
    command: tuple[str, ...]
    timeout: float | None = None
    limits: tuple[tuple[str, int], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    max_attempts: int = 3


@dataclass(frozen=True)
class Claim:
    """A task a node has claimed: attempt is the fence its result must carry."""

    key: str
    attempt: int
    command: tuple[str, ...]
    timeout: float | None
    limits: tuple[tuple[str, int], ...]
    submitted_by: str | None


@dataclass(frozen=True)
class Report:
    """How one attempt ended, as the node reports it."""

    ending: str
    exit_code: int
    error: str = ""
    duration_ms: float | None = None
    stdout_tail: bytes = b""
    stderr_tail: bytes = b""
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    local_task_id: str | None = None
    cancelled: bool = False
    """Ended by a cancel someone asked for: the task's state becomes 'cancelled'."""


@dataclass(frozen=True)
class Attempt:
    attempt: int
    node_id: str
    started_at: datetime
    ended_at: datetime | None
    ending: str | None
    exit_code: int | None
    why: str | None


@dataclass(frozen=True)
class FleetTask:
    """A fleet task's row: queue entry while queued or running, history once ended."""

    key: str
    seq: int
    command: tuple[str, ...]
    timeout: float | None
    limits: dict
    labels: dict
    state: str
    attempt: int
    max_attempts: int
    node_id: str | None
    submitted_by: str | None
    submitted_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    cancel_requested_at: datetime | None
    ending: str | None
    exit_code: int | None
    error: str | None
    duration_ms: float | None
    stdout_tail: bytes | None
    stderr_tail: bytes | None
    stdout_bytes: int | None
    stderr_bytes: int | None
    local_task_id: str | None
    attempts: tuple[Attempt, ...] = ()

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def is_command(self, command) -> bool:
        return tuple(self.command) == tuple(command)

    @classmethod
    def from_row(cls, row: dict[str, Any], attempts=()) -> FleetTask:
        values = {name: row[name] for name in cls.__dataclass_fields__ if name != "attempts"}
        values["command"] = tuple(row["command"])
        for name in ("stdout_tail", "stderr_tail"):
            if values[name] is not None:
                values[name] = bytes(values[name])
        return cls(**values, attempts=tuple(attempts))


@dataclass(frozen=True)
class Node:
    node_id: str
    generation: int
    labels: dict
    parallel: int
    running: int
    http: str | None
    state: str
    started_at: datetime
    heartbeat_at: datetime
    lease_until: datetime
    ended_at: datetime | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Node:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


TASK_COLUMNS = ", ".join(name for name in FleetTask.__dataclass_fields__ if name != "attempts")
NODE_COLUMNS = ", ".join(Node.__dataclass_fields__)
