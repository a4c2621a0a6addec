"""A burst's memory is given back once, after the burst drains, and never during one."""
from __future__ import annotations

from twisted.internet.task import Clock

from agent import memory
from agent.memory import BURST, DELAY, BurstRelease


class Harness:
    def __init__(self, trim=True):
        self.clock = Clock()
        self.live = 0
        self.trims = []
        self.release = BurstRelease(self.clock, lambda: self.live, trim=self.trims.append,
                                    rss=lambda: 1 << 30)
        if not trim:  # as on a C library without malloc_trim
            self.release._trim = None

    def to(self, live: int):
        """Tasks start or end one at a time, as the engine reports them."""
        step = 1 if live > self.live else -1
        while self.live != live:
            self.live += step
            self.release.observe(None)


def test_a_drained_burst_is_trimmed_once_after_the_delay():
    h = Harness()
    h.to(BURST)
    h.to(0)
    assert h.trims == []
    h.clock.advance(DELAY)
    assert h.trims == [0]
    h.to(3)
    h.to(0)
    h.clock.advance(DELAY * 10)
    assert h.trims == [0], "a small load after the trim is no new burst"


def test_fewer_tasks_than_a_burst_are_never_trimmed_for():
    h = Harness()
    h.to(BURST - 1)
    h.to(0)
    h.clock.advance(DELAY * 10)
    assert h.trims == []


def test_a_new_peak_during_the_delay_puts_the_trim_off_until_it_drains():
    h = Harness()
    h.to(BURST)
    h.to(BURST // 10)
    h.to(BURST * 2)
    h.clock.advance(DELAY * 10)
    assert h.trims == []
    h.to(1)
    h.clock.advance(DELAY)
    assert h.trims == [0]


def test_a_half_drained_burst_is_not_over():
    h = Harness()
    h.to(BURST * 4)
    h.to(BURST)  # a quarter still live
    h.clock.advance(DELAY * 10)
    assert h.trims == []


def test_without_malloc_trim_nothing_is_scheduled():
    h = Harness(trim=False)
    h.to(BURST)
    h.to(0)
    assert h.clock.getDelayedCalls() == []


def test_stopping_cancels_a_pending_trim():
    h = Harness()
    h.release.startService()
    h.to(BURST)
    h.to(0)
    h.release.stopService()
    assert h.clock.getDelayedCalls() == []


def test_this_platforms_malloc_trim_is_found_and_callable():
    trim = memory._find_malloc_trim()
    if trim is None:  # pragma: no cover - not glibc
        return
    assert trim(0) in (0, 1)
