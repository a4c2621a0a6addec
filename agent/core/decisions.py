"""What admission answers: one typed decision for a request, whichever door it came through.

A door translates a decision into its wire format and a refusal into its wire
error (one place each); it never asks which door started a task.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from agent.core.task import Task


@dataclass(frozen=True)
class Started:
    """A new task, queued or running."""

    task: Task


@dataclass(frozen=True)
class Attached:
    """The request's id names a live task with the same command: nothing new starts;
    the caller waits for that task (and, if it holds tasks, now holds it too)."""

    task: Task


@dataclass(frozen=True)
class Replay:
    """The request's id names an ended task with the same command: nothing runs; the
    answer is rebuilt from its history record (with .id, .command and .outcome)."""

    record: Any


Decision = Union[Started, Attached, Replay]


class Refused(Exception):
    """Nothing was started and no task is named; `message` says why, for the client."""

    reason = "refused"
    """Why, as one word for counting (a metric's label): never the request's own values."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Busy(Refused):
    """The lane's limit is reached and it rejects rather than queues (or its queue is full)."""

    reason = "busy"

    def __init__(self, message: str = "the concurrency limit is reached"):
        super().__init__(message)


class QueueFull(Busy):
    """A queueing lane's queue is full (--max-queue or --max-queue-bytes): Busy, told apart
    for the operator (a door answers it as Busy)."""

    reason = "queue_full"


class ShuttingDown(Refused):
    """The agent is stopping: it answers for tasks it knows but starts no new one."""

    reason = "shutting_down"

    def __init__(self, message: str = "the agent is shutting down; no task is started"):
        super().__init__(message)


class HistoryDown(Refused):
    """The request needs a durable record (its client will look the task up later),
    and the history cannot be written now."""

    reason = "history_down"

    def __init__(self, error: str):
        super().__init__(f"the task history cannot be written ({error}); no task is started "
                         "until it can be")
        self.error = error


class HistoryFull(Refused):
    """The request needs a durable record, and the output of the tasks still running
    already fills the space the history may use (--keep-bytes): nothing can be pruned."""

    reason = "history_full"

    def __init__(self):
        super().__init__("the output of running tasks already fills --keep-bytes; no task is "
                         "started until some end or are cancelled")


class KeyConflict(Refused):
    """The id names a task that ran another command. Running either would be a guess,
    and the other task's command is not the caller's to read, so it is not shown."""

    reason = "key_conflict"

    def __init__(self, key: str):
        super().__init__(f"id {key!r} was already used for another command; an id names one "
                         "task: use a new id to run a different command")
        self.key = key


class KeyForgotten(Refused):
    """The id named a task that was removed from the history while it was being read."""

    reason = "key_forgotten"

    def __init__(self, key: str):
        super().__init__(f"id {key!r} named a task since removed from the history; try again")
        self.key = key
