"""One submitted task: its request, its state, who holds it, and its Outcome once it ends."""
from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, succeed

from agent.core.outcome import Outcome
from agent.core.request import TaskRequest

if TYPE_CHECKING:
    from agent.runner.process import OutputSink, TaskProcess


class Task:
    """One submitted task: its request, its state, and its Outcome once it ends."""

    def __init__(self, request: TaskRequest, source: str, sink: OutputSink, task_id: str,
                 held: bool = False, launched_by: str | None = None):
        self.id = task_id
        self.request = request
        self.source = source
        self.launched_by = launched_by
        """Who asked for it, as the door knows them (a token's name, a peer's address)."""
        self.sink = sink
        self.state = "queued"
        self.runner: TaskProcess | None = None
        self.outcome: Outcome | None = None
        self.cleanup: str | None = None
        """'complete' once its process group is verified empty, 'incomplete' if
        something in it survived repeated SIGKILL, None until known."""
        self.holders: int | None = 1 if held else None
        """Clients whose going away ends the task (a TCP connection, a POST /run);
        None for a task that lives on its own (POST /tasks)."""
        self._waiters: list[Deferred] = []
        self._cleanup_waiters: list[Deferred] = []
        self._waiting_for_slot: Deferred | None = None

    def ended(self) -> Deferred[Outcome]:
        """A Deferred of the Outcome, new for each caller: what one waiter's
        callbacks return can never reach another's."""
        if self.outcome is not None:
            return succeed(self.outcome)
        waiter: Deferred[Outcome] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def cleaned(self) -> Deferred["Task"]:
        """A Deferred of the task once its cleanup is known (task.cleanup set): after
        the end, when its process group is verified empty (or given up on, within 5 s)."""
        if self.cleanup is not None:
            return succeed(self)
        waiter: Deferred[Task] = Deferred()
        self._cleanup_waiters.append(waiter)
        return waiter

    def hold(self) -> None:
        """One more client (a retry of the same id) now waits for this task."""
        if self.holders is not None:
            self.holders += 1

    def _let_go(self) -> bool:
        """One holder left; True when none is left and the task should end."""
        if self.holders is None or self.outcome is not None:
            return False
        self.holders -= 1
        return self.holders <= 0

    def cancel(self, message: str = "cancelled", grace: float = 0.0) -> None:
        """Drop the task if it waits for a slot; otherwise end its process group."""
        if self._waiting_for_slot is not None:
            self._waiting_for_slot.cancel()
        elif self.runner is not None:
            self.runner.cancel(message, grace)
