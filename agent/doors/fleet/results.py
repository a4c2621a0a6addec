"""What a fleet node reports of an attempt: the ending, and the bounded tail of each stream."""
from __future__ import annotations

from agent.core.outcome import Ending, Outcome
from agent.fleet.records import TAIL_BYTES, Report


class TailSink:
    """Keeps the last `limit` bytes of stdout and stderr and counts every byte; the whole
    output goes to the node's history beside it."""

    def __init__(self, limit: int = TAIL_BYTES):
        self._limit = limit
        self._tails = {1: bytearray(), 2: bytearray()}
        self.counts = {1: 0, 2: 0}

    def received(self, fd: int, data: bytes) -> None:
        tail = self._tails.get(fd)
        if tail is None:
            return
        self.counts[fd] += len(data)
        tail += data
        if len(tail) > 2 * self._limit:  # trim now and then, not on every chunk
            del tail[:-self._limit]

    def tail(self, fd: int) -> bytes:
        return bytes(self._tails[fd][-self._limit:])


def report_of(outcome: Outcome, sink: TailSink | None, local_task_id: str | None,
              cancelled: bool) -> Report:
    """The Report of a finished attempt (sink None: a replay, whose output stays on the node)."""
    return Report(
        ending=outcome.ending.value, exit_code=outcome.exit_code, error=outcome.error,
        duration_ms=outcome.duration_ms,
        stdout_tail=b"" if sink is None else sink.tail(1),
        stderr_tail=b"" if sink is None else sink.tail(2),
        stdout_bytes=0 if sink is None else sink.counts[1],
        stderr_bytes=0 if sink is None else sink.counts[2],
        local_task_id=local_task_id,
        cancelled=cancelled and outcome.ending is Ending.CANCELLED)


def refusal_report(message: str) -> Report:
    """A claim this node may never run (not on its allow-list, its id taken): a start failure."""
    return Report(ending=Ending.START_FAILED.value, exit_code=-1, error=message)
