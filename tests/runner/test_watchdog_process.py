"""The watchdog with its real program and real task groups: the lease, the agent's end, the pipe."""
from __future__ import annotations

import os
import subprocess

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactor

from agent.runner.process import start_task
from agent.runner.watchdog import LineWriter, Watchdog, launch_process
from tests.fakes import StdoutCollector
from tests.procs import group_members

GRANDCHILDREN = "sleep 300 & sleep 300 & wait"


async def eventually(predicate, timeout: float = 10.0, step: float = 0.02) -> bool:
    """Poll without blocking the reactor; True as soon as predicate holds."""
    waited = 0.0
    while not predicate():
        if waited >= timeout:
            return False
        await task.deferLater(reactor, step)
        waited += step
    return True


@pytest.fixture
def groups():
    """sleep_group() -> pgid: a shell and two sleeping children in a group of their own."""
    started: list[subprocess.Popen] = []

    def sleep_group() -> int:
        proc = subprocess.Popen(["sh", "-c", GRANDCHILDREN], process_group=0)
        started.append(proc)
        return proc.pid
    yield sleep_group
    for proc in started:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait()


async def three_members(pgid: int) -> None:
    assert await eventually(lambda: len(group_members(pgid)) == 3), "the group never filled"


@pytest.fixture
def watchdog():
    watchdog = Watchdog(reactor)
    watchdog.start()
    yield watchdog
    pytest_twisted.blockon(watchdog.stop())


def _pid(watchdog: Watchdog) -> int:
    return watchdog._process.pid  # noqa: SLF001 - which process to look at


@pytest_twisted.ensureDeferred
async def test_the_watchdog_lives_in_a_session_of_its_own(watchdog):
    pid = _pid(watchdog)
    assert os.getsid(pid) == pid and os.getpgid(pid) == pid


@pytest_twisted.ensureDeferred
async def test_when_the_lease_runs_out_the_fenced_group_dies_and_the_other_lives(watchdog,
                                                                                 groups):
    fenced, free = groups(), groups()
    await three_members(fenced)
    await three_members(free)
    watchdog.watch(fenced, fenced=True)
    watchdog.watch(free)
    watchdog.lease(1.0)
    assert await eventually(lambda: not group_members(fenced)), "it outlived its lease"
    assert len(group_members(free)) == 3, "an unfenced group does not depend on the lease"
    assert await eventually(lambda: fenced not in watchdog.watched), "the agent heard of it"
    assert watchdog.watched == {free: False}


@pytest_twisted.ensureDeferred
async def test_a_renewed_lease_keeps_the_fenced_group_alive(watchdog, groups):
    fenced = groups()
    await three_members(fenced)
    watchdog.watch(fenced, fenced=True)
    for _ in range(12):  # 3 s of a 2 s lease, renewed every 0.25 s
        watchdog.lease(2.0)
        await task.deferLater(reactor, 0.25)
    assert len(group_members(fenced)) == 3
    assert watchdog.watched == {fenced: True}


@pytest_twisted.ensureDeferred
async def test_a_clean_stop_kills_nothing(groups):
    watchdog = Watchdog(reactor)
    watchdog.start()
    pgid = groups()
    await three_members(pgid)
    watchdog.watch(pgid)
    pid = _pid(watchdog)
    await watchdog.stop()
    assert not _alive(pid), "it exits on bye"
    assert len(group_members(pgid)) == 3


class _Quiet(ProcessProtocol):
    def __init__(self):
        self.ended = task.Deferred()

    def processEnded(self, reason):
        self.ended.callback(None)


@pytest_twisted.ensureDeferred
async def test_when_the_agents_end_of_the_pipe_closes_every_watched_group_dies(groups):
    """What a kill -9 of the agent does to the pipe, without killing the test."""
    kept, killed_a, killed_b = groups(), groups(), groups()
    for pgid in (kept, killed_a, killed_b):
        await three_members(pgid)
    protocol = _Quiet()
    transport, writer = launch_process(reactor, protocol)
    for line in (f"watch {killed_a}\n", f"watch {killed_b} fenced\n", f"watch {kept}\n",
                 f"forget {kept}\n"):
        writer.write(line.encode())
    writer.close()  # no bye
    assert await eventually(lambda: not group_members(killed_a) and not group_members(killed_b)), \
        "grandchildren included"
    await protocol.ended
    assert len(group_members(kept)) == 3, "a forgotten group is not the watchdog's"


@pytest.mark.parametrize("cwd", [None, "/"], ids=["posix_spawn", "fork"])
@pytest_twisted.ensureDeferred
async def test_no_task_inherits_the_watchdogs_pipe(watchdog, cwd):
    pipe = os.readlink(f"/proc/{_pid(watchdog)}/fd/0")
    assert pipe.startswith("pipe:")
    sink = StdoutCollector()
    runner = start_task(reactor, ["sh", "-c", 'for f in /proc/$$/fd/*; do readlink "$f"; done'],
                        sink, cwd=cwd)
    await runner.ended
    held = sink.text().split()
    assert held and pipe not in held


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- the agent's end of the pipe

@pytest.fixture
def pipe():
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    yield read_end, write_end
    for fd in (read_end, write_end):
        try:
            os.close(fd)
        except OSError:
            pass


def _drain(fd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def test_a_line_is_written_at_once_not_at_the_next_turn(pipe):
    memory = MemoryReactor()
    writer = LineWriter(memory, os.dup(pipe[1]))
    writer.write(b"watch 500\n")
    assert _drain(pipe[0]) == b"watch 500\n"
    assert writer not in memory.writers


def test_a_full_pipe_keeps_the_rest_until_the_watchdog_reads(pipe):
    memory = MemoryReactor()
    writer = LineWriter(memory, os.dup(pipe[1]))
    lines = [f"watch {pgid}\n".encode() for pgid in range(10_000, 30_000)]
    for line in lines:
        writer.write(line)
    assert writer in memory.writers, "the rest waits for the pipe to take it"
    writer.close()
    assert not writer.closed, "closing waits for what is pending"
    received = b""
    while writer in memory.writers:
        received += _drain(pipe[0])
        writer.doWrite()
    received += _drain(pipe[0])
    assert received == b"".join(lines), "in order, nothing lost or cut"
    assert writer.closed


def test_a_watchdog_gone_makes_writes_no_error(pipe):
    memory = MemoryReactor()
    writer = LineWriter(memory, os.dup(pipe[1]))
    os.close(pipe[0])
    writer.write(b"watch 500\n")  # EPIPE
    assert writer.closed
    writer.write(b"watch 501\n")
