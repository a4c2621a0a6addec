"""A burst's memory is given back once, after the burst drains, and never during one."""
from __future__ import annotations

import os

import pytest
from twisted.internet.task import Clock

from agent import memory
from agent.memory import BURST, DELAY, BurstRelease
from tests.e2e.conftest import start_agent  # noqa: F401 (a real agent for the last test)


class Harness:
    def __init__(self, trim=True):
        self.clock = Clock()
        self.live = 0
        self.trims = []
        self.free = 0
        self.release = BurstRelease(self.clock, lambda: self.live, trim=self.trims.append,
                                    rss=lambda: 1 << 30, free_heap=lambda: self.free)
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


# -- large results: freed blocks kept for reuse while busy, given back when idle

def test_a_quiet_second_with_much_heap_free_is_trimmed_once():
    h = Harness()
    h.to(1)
    h.free = memory.IDLE_RETAINED + 1
    h.to(0)
    h.clock.advance(DELAY - 0.1)
    assert h.trims == []
    h.clock.advance(0.1)
    assert h.trims == [0]
    h.clock.advance(DELAY * 10)
    assert h.trims == [0], "nothing ran since: nothing to trim again"


def test_a_task_meanwhile_puts_the_idle_trim_off_and_little_free_heap_needs_none():
    h = Harness()
    h.free = memory.IDLE_RETAINED + 1
    h.to(1)
    h.to(0)
    h.clock.advance(DELAY / 2)
    h.to(1)  # the next large result: its pages are the last one's
    h.clock.advance(DELAY)
    assert h.trims == []
    h.to(0)
    h.clock.advance(DELAY / 2)
    h.to(1)
    h.to(0)  # ended just now: the quiet second starts again
    h.clock.advance(DELAY / 2)
    assert h.trims == []
    h.clock.advance(DELAY)  # a look every DELAY: the first once the second is quiet
    assert h.trims == [0]
    h.free = memory.IDLE_RETAINED
    h.to(1)
    h.to(0)
    h.clock.advance(DELAY * 2)
    assert h.trims == [0]


def _faults_and_rss(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[7]), int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def test_a_real_agent_reuses_a_large_result_s_pages_and_gives_them_back_when_idle(start_agent):
    """keep_freed_memory and the idle trim, in the agent's own process: the second 64 MiB
    result faults in a fraction of the first one's pages, and a quiet second later the
    agent's memory is back near where it started."""
    if memory._find_free_heap() is None:
        pytest.skip("not glibc: no mallinfo2 to see the free heap by")
    agent = start_agent()
    client = agent.connect()
    request = {"command": ["sh", "-c", "yes 0123456789abcdef0123456789 | head -c 64M"]}
    client.send({"command": ["true"]})
    client.receive()
    _, idle_rss = _faults_and_rss(agent.proc.pid)
    faults = []
    for _ in range(2):
        before, _ = _faults_and_rss(agent.proc.pid)
        client.send(request)
        assert len(client.receive()["output"]) == 64 << 20
        faults.append(_faults_and_rss(agent.proc.pid)[0] - before)
    assert faults[1] * 4 < faults[0], faults  # 64 MiB of new pages is 16,384 faults
    agent.wait_for_log("idle: gave", timeout=10)
    assert _faults_and_rss(agent.proc.pid)[1] < idle_rss + (24 << 20)


def test_a_busy_agent_that_never_goes_quiet_trims_after_a_while_all_the_same():
    h = Harness()
    h.to(1)
    h.free = memory.IDLE_RETAINED + 1
    for _ in range(int(memory.BUSY_RETAINED_FOR / DELAY) * 4):
        if h.trims:
            break
        h.to(2)  # a task starts and ends every half second, one always running
        h.clock.advance(DELAY / 2)
        h.to(1)
        h.clock.advance(DELAY / 2)
    assert h.trims == [0]
    assert h.clock.seconds() <= memory.BUSY_RETAINED_FOR + 2 * DELAY
