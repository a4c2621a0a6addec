"""Concurrency limits: how many tasks a door (or the whole node) may run at once."""
from __future__ import annotations

from twisted.internet.defer import Deferred, DeferredSemaphore, succeed

from agent.core.decisions import Busy


class Lane:
    """A concurrency limit shared by every task submitted through it.

    limit 0 means unlimited. Over the limit a queueing lane waits FIFO for a
    free slot, a rejecting lane raises Busy at once; a queueing lane with
    max_waiting tasks already waiting raises Busy too (0 = no bound), so a
    flood cannot pile up in the agent's memory.
    """

    def __init__(self, limit: int, queue: bool = False, max_waiting: int = 0):
        self.limit = limit
        self.queue = queue
        self.max_waiting = max_waiting
        self._slots = DeferredSemaphore(limit) if limit > 0 else None

    @property
    def running(self) -> int:
        return 0 if self._slots is None else self._slots.limit - self._slots.tokens

    def acquire(self) -> Deferred:
        if self._slots is None:
            return succeed(None)
        if self._slots.tokens == 0 and (not self.queue or 0 < self.max_waiting <= self.waiting):
            raise Busy()
        return self._slots.acquire()

    @property
    def waiting(self) -> int:
        return 0 if self._slots is None else len(self._slots.waiting)

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()
