"""agent-scheduler's progress line: one line on a terminal's stderr, rewritten in place.

done/total, ok, failed, busy answers retried, tasks a second and the time left,
at most every REDRAW seconds. Nothing at all when stderr is not a terminal: a
log file or a pipe gets only the complaints and the closing summary.
"""
from __future__ import annotations

from typing import TextIO

REDRAW = 0.2
"""Seconds between redraws: often enough to look alive, rarely enough to cost nothing."""

_CLEAR = "\r\x1b[K"  # back to the start of the line, and clear it


class Progress:
    def __init__(self, err: TextIO, total: int, clock, enabled: bool | None = None):
        """enabled: None asks err whether it is a terminal."""
        self._err = err
        self._total = total
        self._clock = clock
        self._started = clock.seconds()
        self._last = None
        self._drawn = False
        self.enabled = _is_terminal(err) if enabled is None else enabled

    def update(self, summary, force: bool = False) -> None:
        """Redraw from the scheduler's Summary (not more often than REDRAW, unless force)."""
        if not self.enabled:
            return
        now = self._clock.seconds()
        if not force and self._last is not None and now - self._last < REDRAW:
            return
        self._last = now
        self._err.write(_CLEAR + self.line(summary, now - self._started))
        self._err.flush()
        self._drawn = True

    def line(self, summary, elapsed: float) -> str:
        done = summary.ok + summary.failed + summary.timed_out + summary.busy + summary.missing
        rate = done / elapsed if elapsed > 0 else 0.0
        left = (f", {_duration((self._total - done) / rate)} left"
                if rate > 0 and done < self._total else "")
        return (f"{done}/{self._total} done: {summary.ok} ok, "
                f"{summary.failed + summary.timed_out} failed, {summary.retried} busy retried, "
                f"{rate:.1f} tasks/s{left}")

    def clear(self) -> None:
        """Take the line away (before a complaint or the summary is written)."""
        if self._drawn:
            self._err.write(_CLEAR)
            self._err.flush()
            self._drawn = False


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
