"""A task as the history records it: the record, its states, the row it is stored as,
and the Outcome it describes: the one place that maps tasks, records and outcomes.

Rows are plain tuples in COLUMNS order, built on the reactor for every state
change of every task and written later by the writer thread; this module is
the only one that knows which column sits where.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, fields, replace
from typing import Callable, Protocol

from agent.core.outcome import LOST, Ending, Outcome
from agent.history.spool import TaskOutput

STATES = ("queued", "running", "succeeded", "failed", "timed_out", "cancelled", "lost")
ENDED_STATES = frozenset(STATES[2:])
ENDED = tuple(sorted(ENDED_STATES))
"""The ended states in a fixed order, as SQL parameters."""
_STATE_OF_ENDING = {Ending.TIMED_OUT: "timed_out", Ending.CANCELLED: "cancelled"}
_REASON_OF_STATE = {"succeeded": Ending.EXITED.value, "timed_out": Ending.TIMED_OUT.value,
                    "cancelled": Ending.CANCELLED.value, "lost": LOST}
_ENDINGS = {ending.value: ending for ending in Ending}
TASK_ID = re.compile(r"^[0-9a-f]{32}$")


class ProcessIdentity(Protocol):
    """What tells a process from a later one given the same PID (agent.runner.procinfo.ProcStat)."""

    start_time: int
    session: int


Identify = Callable[[int], "ProcessIdentity | None"]
"""A live process's identity by PID, None once it is gone: the runner's, handed in."""


@dataclass(frozen=True)
class TaskRecord:
    """One task as the history knows it; times are UNIX seconds."""

    id: str
    source: str
    command: tuple[str, ...]
    state: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    duration_ms: float | None = None
    exit_code: int | None = None
    error: str | None = None
    pid: int | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    stdout_dropped: int = 0
    stderr_dropped: int = 0
    timeout: float | None = None
    request_id: str | None = None
    proc_start: int | None = None
    """/proc start time of pid, with session: tells our group from a later one that reused the PID."""
    session: int | None = None
    reason: str | None = None
    """Why it ended: an agent.core.outcome.Ending value, or 'lost'; None while it runs
    (and for tasks recorded before the agent kept reasons)."""
    signal: int | None = None
    """The signal that killed it, when the agent did not send it."""
    cleanup: str | None = None
    """'complete' once its process group was verified empty, 'incomplete' if a
    member survived repeated SIGKILL; None until known."""
    launched_by: str | None = None
    """Who asked for it: the HTTP token's name, the TCP client certificate's subject, or the
    TCP peer's address (None for tasks recorded before the agent kept it)."""
    command_cut: int = 0
    """Bytes of the command's JSON the record does not keep (past MAX_COMMAND_BYTES)."""
    command_sha256: str | None = None
    """When the command was cut: the SHA-256 of its whole JSON, so a retry of its id is
    still recognised as the same command."""

    def is_command(self, command) -> bool:
        """Whether command is the one this task ran (a cut command is compared by digest)."""
        if not self.command_cut:
            return tuple(command) == self.command
        return _digest(command_json(command)) == self.command_sha256

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES

    @property
    def why_it_ended(self) -> tuple[str | None, int | None]:
        """(reason, signal): one of agent.core.outcome.REASONS, None while it runs. Records
        written before the agent kept reasons have theirs read from the state and error."""
        if self.reason is not None or not self.ended:
            return self.reason, self.signal
        reason = _REASON_OF_STATE.get(self.state)
        if reason is not None:
            return reason, None
        error = self.error or ""
        if error.startswith("killed by signal") and self.exit_code and self.exit_code > 128:
            return Ending.SIGNALLED.value, self.exit_code - 128
        if error == "output limit exceeded":
            return Ending.OUTPUT_LIMIT.value, None
        return (Ending.START_FAILED if self.started_at is None else Ending.EXITED).value, None

    @property
    def outcome(self) -> Outcome:
        """The Outcome an ended task's record describes, as the doors encode it (a replay)."""
        reason, signal = self.why_it_ended
        duration_ms = self.duration_ms
        if duration_ms is None and self.started_at is not None:
            # lost: it ran until the agent died, somewhere before finished_at
            duration_ms = max(0.0, ((self.finished_at or self.started_at) - self.started_at) * 1000)
        ending = _ENDINGS.get(reason, Ending.CANCELLED)  # lost: the agent's death ended it
        return Outcome(ending, -1 if self.exit_code is None else self.exit_code, self.error or "",
                       signal, self.pid, self.started_at, duration_ms)


@dataclass(frozen=True)
class Page:
    records: list[TaskRecord]
    next: str | None
    """The cursor for the following page, None on the last one."""


COLUMNS = tuple(f.name for f in fields(TaskRecord))
_STATE, _PID, _PROC_START = COLUMNS.index("state"), COLUMNS.index("pid"), COLUMNS.index("proc_start")


MAX_COMMAND_BYTES = 64 << 10
"""Most of a command's JSON a record keeps: a queue of huge argvs must not fill the disk
(300 queued 1 MB requests wrote 600 MB); the task itself still gets its whole argv."""


def command_json(command) -> str:
    return json.dumps(list(command))


def command_text(text: str) -> str:
    """text as it stands inside a record's command JSON (escaped the same way), to search for."""
    return json.dumps(text)[1:-1]


def kept_command(command) -> tuple[str, int, str | None]:
    """(the JSON a record keeps, the bytes cut, the whole JSON's SHA-256 if any were cut).

    Whole arguments are kept while they fit; the first that does not is cut short
    and the rest are left out."""
    whole = command_json(command)
    if len(whole) <= MAX_COMMAND_BYTES:
        return whole, 0, None
    kept: list[str] = []
    budget = MAX_COMMAND_BYTES
    for arg in command:
        size = len(json.dumps(arg)) + 2
        if size > budget:
            kept.append(arg[:max(0, budget - 4) // 6])  # \uXXXX is the longest escape
            break
        kept.append(arg)
        budget -= size
    cut_json = json.dumps(kept)
    return cut_json, len(whole) - len(cut_json), _digest(whole)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class Live:
    """What the store keeps in memory for a task while it is queued or running."""

    __slots__ = ("created_at", "command_json", "command_cut", "command_sha256", "output")

    def __init__(self, created_at: float, command, output: TaskOutput):
        self.created_at = created_at
        self.command_json, self.command_cut, self.command_sha256 = kept_command(command)
        self.output = output


def row_of(task, live: Live, now: float) -> tuple:
    """An engine task as a row in COLUMNS order, built straight from its attributes:
    this runs on the reactor for every state change of every task, TCP ones included."""
    runner, outcome = task.runner, task.outcome
    pid = started_at = finished_at = duration_ms = exit_code = error = reason = signal = None
    if runner is not None:
        pid, started_at = runner.pid, runner.started_at
    if outcome is not None:
        exit_code, error, duration_ms = outcome.exit_code, outcome.error, outcome.duration_ms
        reason, signal = outcome.ending.value, outcome.signal
        if outcome.started:
            pid, started_at = outcome.pid, outcome.started_at
            finished_at = started_at + duration_ms / 1000.0
        else:
            pid = started_at = None
            finished_at = now
    (out, out_dropped), (err, err_dropped) = live.output.size(1), live.output.size(2)
    request = task.request
    return (task.id, task.source, live.command_json, state_of(task), live.created_at,
            started_at, finished_at, duration_ms, exit_code, error, pid,
            out, err, out_dropped, err_dropped, request.timeout, request.id, None, None,
            reason, signal, task.cleanup, task.launched_by, live.command_cut,
            live.command_sha256)


def with_identity(row: tuple, identify: Identify) -> tuple:
    """A running task's row gets its process's start time and session, read from /proc when
    the row is written: a task that ended before then needs none, so short tasks cost no read.
    The task is recorded as ended when its child is reaped (or at most the drain grace later),
    so the PID is still the child's, or gone, never yet another process's."""
    if row[_STATE] != "running" or not row[_PID]:
        return row
    stat = identify(row[_PID])
    if stat is None:
        return row
    return (*row[:_PROC_START], stat.start_time, stat.session, *row[_PROC_START + 2:])


def row_has_ended(row: tuple) -> bool:
    return row[_STATE] in ENDED_STATES


def from_row(row: tuple) -> tuple[int, TaskRecord]:
    """(seq, record) from a row read as seq followed by COLUMNS."""
    values = dict(zip(COLUMNS, row[1:]))
    values["command"] = tuple(json.loads(values["command"]))
    return row[0], TaskRecord(**values)


def record_of(row: tuple) -> TaskRecord:
    """The record a row not yet written describes."""
    return from_row((None, *row))[1]


def state_of(task) -> str:
    """The history's word for an engine task's state."""
    if task.state != "finished":
        return task.state
    outcome = task.outcome
    if outcome.ending is Ending.EXITED:
        return "succeeded" if outcome.exit_code == 0 else "failed"
    return _STATE_OF_ENDING.get(outcome.ending, "failed")


def with_sizes(record: TaskRecord, output: TaskOutput) -> TaskRecord:
    """A running task's byte counts move faster than its record: these are the spool's."""
    (out, out_dropped), (err, err_dropped) = output.size(1), output.size(2)
    return replace(record, stdout_bytes=out, stderr_bytes=err,
                   stdout_dropped=out_dropped, stderr_dropped=err_dropped)


def kept_bytes(output: TaskOutput) -> int:
    """The bytes a spool holds on disk, as retention counts an ended task's from its record."""
    (out, out_dropped), (err, err_dropped) = output.size(1), output.size(2)
    return out - out_dropped + err - err_dropped
