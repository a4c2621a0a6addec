"""The value a finished task produces, shared by the runner, engine and doors."""
from __future__ import annotations

import enum
import signal
from dataclasses import dataclass


class Ending(str, enum.Enum):
    """Why a task ended; the doors map each to their own wire words."""

    EXITED = "exited"
    SIGNALLED = "signalled"
    TIMED_OUT = "timeout"
    CANCELLED = "cancelled"
    OUTPUT_LIMIT = "output_cap"
    START_FAILED = "start_failed"


LOST = "lost"
"""The reason the history gives a task that was running when the agent died."""
REASONS = (*(ending.value for ending in Ending), LOST)


@dataclass(frozen=True)
class Outcome:
    """How one task ended.

    exit_code follows the TCP protocol: the process's own status when it
    exited, 128+N when a signal the agent did not send killed it, and -1 when
    the agent ended it (timeout, cancel) or it never started.
    """

    ending: Ending
    exit_code: int
    error: str = ""
    signal: int | None = None
    pid: int | None = None
    started_at: float | None = None
    duration_ms: float | None = None

    @property
    def started(self) -> bool:
        """False for a task that never ran: it could not start or was dropped from the queue."""
        return self.started_at is not None

    @property
    def succeeded(self) -> bool:
        """The program ran and exited 0."""
        return self.ending is Ending.EXITED and self.exit_code == 0

    @classmethod
    def start_failed(cls, error: str) -> Outcome:
        return cls(Ending.START_FAILED, -1, error)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
