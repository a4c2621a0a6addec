"""Keep freed memory for reuse while the agent is busy; give it back once it is quiet.

Thousands of tasks in flight at once take the agent from about 50 MB to
over 100 MB, and C allocators keep what was freed for reuse: glibc returns
free pages inside its heap only when asked (malloc_trim). So once a burst
has drained, the agent asks, once. That reaches every allocation when the
agent runs with PYTHONMALLOC=malloc (as `make run` and examples/agent.service
start it); under CPython's default allocator most of a burst stays in
pymalloc's arenas, which the trim cannot reach (see README, Guarantees).

Large results go the other way: a 200 MiB stdout is read and escaped a
megabyte at a time, and by default glibc maps each such block afresh and
unmaps it when freed, so every result faults in some 400 MiB of new pages
(52,000 faults, a fifth of the agent's CPU for it). The agent's own process
keeps them on its heap instead (keep_freed_memory), and gives back what is
free there once no task has run for DELAY, or after BUSY_RETAINED_FOR if it
never goes quiet (IDLE_RETAINED).
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

IDLE_RETAINED = 32 << 20
"""Free heap an agent with no task for DELAY may keep; past it, the heap is trimmed."""

BUSY_RETAINED_FOR = 10.0
"""Seconds a busy agent (never quiet for DELAY) may keep over IDLE_RETAINED free before
it trims anyway: a stream of small tasks after one huge result must not hold it for good."""

LARGEST_ON_HEAP = 32 << 20
"""Blocks up to this size come from the heap and return to it (glibc's most)."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _find_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _find_free_heap() -> Callable[[], int] | None:
    """Bytes free in glibc's heap (mallinfo2's fordblks), or None without mallinfo2."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.argtypes = []
    mallinfo2.restype = _MallInfo2
    return lambda: mallinfo2().fordblks


def keep_freed_memory() -> bool:
    """Have glibc serve blocks up to LARGEST_ON_HEAP from the heap and keep what is freed
    there until the agent trims it (BurstRelease); True if set. Only where the agent can
    also see and trim its free heap, or freed memory would never go back."""
    if _find_malloc_trim() is None or _find_free_heap() is None:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, LARGEST_ON_HEAP)
                and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def _rss_bytes() -> int | None:
    """Resident set size, from /proc (None elsewhere): for the log line only."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class BurstRelease(Service):
    """Engine observer: after a burst of live tasks drains, trim the C heap once; and
    while over IDLE_RETAINED of it is free, trim it once no task has run for DELAY, or
    once it has been so for BUSY_RETAINED_FOR (looked at every DELAY while tasks run)."""

    def __init__(self, reactor, live: Callable[[], int], trim: Callable[[int], int] | None = None,
                 rss=_rss_bytes, free_heap: Callable[[], int] | None = None):
        """trim: malloc_trim (found in the C library when not given); live: tasks live now;
        free_heap: bytes free in the heap (mallinfo2, when not given)."""
        self._reactor = reactor
        self._live = live
        self._trim = trim or _find_malloc_trim()
        self._rss = rss
        self._free_heap = free_heap or _find_free_heap()
        self._peak = 0
        self._call = None
        self._last_change = 0.0
        self._free_since: float | None = None
        self._idle_call = None

    def observe(self, task) -> None:
        live = self._live()
        self._last_change = self._reactor.seconds()
        if self._idle_call is None and self._free_heap is not None and self._trim is not None:
            self._idle_call = self._reactor.callLater(DELAY, self._idle)
        if live > self._peak:
            self._peak = live
            if self._call is not None:
                self._call.cancel()
                self._call = None
        elif self._call is None and self._drained(live):
            self._call = self._reactor.callLater(DELAY, self._release)

    def stopService(self):
        for name in ("_call", "_idle_call"):
            call = getattr(self, name)
            setattr(self, name, None)
            if call is not None and call.active():
                call.cancel()
        return super().stopService()

    def _idle(self) -> None:
        """DELAY after a task's change: trim if much of the heap is free and the agent has
        been quiet for DELAY, or has kept it BUSY_RETAINED_FOR; else look again later."""
        self._idle_call = None
        free, now = self._free_heap(), self._reactor.seconds()
        if free <= IDLE_RETAINED:
            self._free_since = None
            return  # the next task's change looks again
        if self._free_since is None:
            self._free_since = now
        quiet = not self._live() and now - self._last_change >= DELAY
        if not quiet and now - self._free_since < BUSY_RETAINED_FOR:
            self._idle_call = self._reactor.callLater(DELAY, self._idle)
            return
        self._free_since = None
        self._trim(0)
        log.info("{why}: gave {mib:.0f} MiB of free heap back to the system",
                 why="idle" if quiet else f"busy for {BUSY_RETAINED_FOR:.0f} s",
                 mib=free / (1 << 20))

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
