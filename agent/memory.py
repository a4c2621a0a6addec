"""Give a burst's memory back to the system once the burst is over.

Thousands of tasks in flight at once take the agent from about 50 MB to
over 100 MB, and C allocators keep what was freed for reuse: glibc returns
free pages inside its heap only when asked (malloc_trim). So once a burst
has drained, the agent asks, once. That reaches every allocation when the
agent runs with PYTHONMALLOC=malloc (as `make run` and examples/agent.service
start it); under CPython's default allocator most of a burst stays in
pymalloc's arenas, which the trim cannot reach (see README, Guarantees).
"""
from __future__ import annotations

import ctypes
import os
import time
from typing import Callable

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger()

BURST = 256
"""Tasks live at once that count as a burst worth giving back."""

DRAINED_FRACTION = 8
"""A burst has drained when fewer than 1/8 of its peak are still live."""

DELAY = 1.0
"""Seconds the drain must last: a stream of bursts is trimmed once, not each time."""


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def _rss_bytes() -> int | None:
    """Resident set size, from /proc (None elsewhere): for the log line only."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class BurstRelease(Service):
    """Engine observer: after a burst of live tasks drains, trim the C heap once."""

    def __init__(self, reactor, live: Callable[[], int], trim: Callable[[int], int] | None = None,
                 rss=_rss_bytes):
        """trim: malloc_trim (found in the C library when not given); live: tasks live now."""
        self._reactor = reactor
        self._live = live
        self._trim = trim or _find_malloc_trim()
        self._rss = rss
        self._peak = 0
        self._call = None

    def observe(self, task) -> None:
        live = self._live()
        if live > self._peak:
            self._peak = live
            if self._call is not None:
                self._call.cancel()
                self._call = None
        elif self._call is None and self._drained(live):
            self._call = self._reactor.callLater(DELAY, self._release)

    def stopService(self):
        if self._call is not None:
            self._call.cancel()
            self._call = None
        return super().stopService()

    def _drained(self, live: int) -> bool:
        return (self._trim is not None and self._peak >= BURST
                and live * DRAINED_FRACTION < self._peak)

    def _release(self) -> None:
        self._call = None
        live = self._live()
        if not self._drained(live):
            return  # busy again: the next drain schedules another try
        before, started = self._rss(), time.perf_counter()
        self._trim(0)
        took, after = time.perf_counter() - started, self._rss()
        if before is not None and after is not None:
            log.info("after a burst of {peak} tasks, gave {mib:.0f} MiB back to the system "
                     "in {ms:.1f} ms (RSS now {rss:.0f} MiB)", peak=self._peak,
                     mib=(before - after) / (1 << 20), ms=took * 1000, rss=after / (1 << 20))
        self._peak = live
