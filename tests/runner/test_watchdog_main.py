"""The watchdog program's logic, on a scripted pipe and a fake clock: no process, no sleep."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.runner import watchdog_main
from agent.runner import watchdog_wire as wire
from agent.runner.watchdog_main import MAX_WAIT, REST, Guard, serve

REPO = Path(__file__).resolve().parents[2]


class Kills:
    """Stands in for killpg: records each group, and says whether it still existed."""

    def __init__(self, *gone: int):
        self.groups: list[int] = []
        self.gone = set(gone)

    def __call__(self, pgid: int) -> bool:
        self.groups.append(pgid)
        return pgid not in self.gone


class ScriptedAgent:
    """The agent's side of the pipes: bytes that arrive at given times on a fake
    clock, which moves only when the watchdog waits."""

    def __init__(self, *arrivals: tuple[float, bytes]):
        self.now = 0.0
        self.arrivals = list(arrivals)
        self.written: list[bytes] = []
        self.waits: list[float | None] = []
        self.rests: list[float] = []

    def wait(self, timeout: float | None) -> bool:
        self.waits.append(timeout)
        due = self.arrivals[0][0] if self.arrivals else None
        if due is None:
            assert timeout is not None, "the watchdog would sleep for ever with nothing to come"
            self.now += timeout
            return False
        if timeout is not None and self.now + timeout < due:
            self.now += timeout
            return False
        self.now = max(self.now, due)
        return True

    def read(self) -> bytes:
        """Everything that has arrived by now, as one read of a pipe would give."""
        data = b""
        while self.arrivals and self.arrivals[0][0] <= self.now:
            chunk = self.arrivals.pop(0)[1]
            if not chunk:  # the end comes on a read of its own
                if data:
                    self.arrivals.insert(0, (self.now, chunk))
                return data
            data += chunk
        return data

    def rest(self, seconds: float) -> None:
        self.rests.append(seconds)
        self.now += seconds

    def serve(self, guard: Guard) -> str:
        return serve(guard, self.read, self.written.append, self.wait, lambda: self.now,
                     self.rest)


def lines(*messages) -> bytes:
    return b"".join(wire.encode(m) for m in messages)


EOF = b""


# -- the agent goes away

def test_when_the_agent_goes_away_every_watched_group_is_killed():
    kills = Kills()
    agent = ScriptedAgent((0, lines(wire.Watch(100), wire.Watch(200, fenced=True))), (5, EOF))
    assert agent.serve(Guard(kills)) == "eof"
    assert sorted(kills.groups) == [100, 200]


def test_a_forgotten_group_is_not_killed_when_the_agent_goes_away():
    kills = Kills()
    agent = ScriptedAgent((0, lines(wire.Watch(100), wire.Watch(200), wire.Forget(100))), (1, EOF))
    agent.serve(Guard(kills))
    assert kills.groups == [200]


def test_bye_exits_and_kills_nothing():
    kills = Kills()
    agent = ScriptedAgent((0, lines(wire.Watch(100), wire.Bye())), (1, EOF))
    assert agent.serve(Guard(kills)) == "bye"
    assert kills.groups == []


def test_lines_split_across_reads_are_joined():
    kills = Kills()
    agent = ScriptedAgent((0, b"wat"), (0, b"ch 1"), (0, b"01\nwatch 102\n"), (1, EOF))
    agent.serve(Guard(kills))
    assert sorted(kills.groups) == [101, 102]


def test_a_bad_line_is_reported_and_the_next_one_still_counts():
    kills = Kills()
    agent = ScriptedAgent((0, b"watch 0\n" + lines(wire.Watch(100))), (1, EOF))
    agent.serve(Guard(kills))
    assert kills.groups == [100]
    assert agent.written == [b"error not a task's process group: 0\n"]


def test_an_endless_line_is_dropped_with_a_report_not_kept():
    agent = ScriptedAgent(*[(t, b"7" * 4096) for t in (0, 0.1, 0.2)],
                          (0.3, b"\n" + lines(wire.Watch(100))), (1, EOF))
    guard = Guard(Kills())
    agent.serve(guard)
    assert agent.written[0].startswith(b"error a line longer than 4096 bytes")


def test_without_a_lease_the_watchdog_sleeps_until_the_agent_speaks():
    agent = ScriptedAgent((0, lines(wire.Watch(100, fenced=True))), (3600, EOF))
    agent.serve(Guard(Kills()))
    assert agent.waits == [None, None]


# -- the lease

def test_fenced_groups_die_when_the_lease_runs_out_and_the_agent_hears_of_it():
    kills = Kills()
    agent = ScriptedAgent((0, lines(wire.Watch(100, fenced=True), wire.Watch(200),
                                    wire.Lease(10.0))), (60, EOF))
    guard = Guard(kills)
    agent.serve(guard)
    assert kills.groups[0] == 100
    assert agent.written == [b"fenced 100\n"]
    assert kills.groups == [100, 200], "then only the unfenced one, at EOF"


def test_the_fence_falls_at_the_deadline_not_before():
    kills = Kills()
    guard = Guard(kills)
    guard.handle(wire.Watch(100, fenced=True), now=0)
    guard.handle(wire.Lease(10.0), now=0)
    assert guard.expire(9.999) == ()
    assert kills.groups == []
    assert guard.expire(10.0) == (100,)
    assert guard.watched == set() and guard.fenced == set()


def test_a_renewed_lease_keeps_the_fenced_groups_alive():
    kills = Kills()
    renewals = [(t, lines(wire.Lease(10.0))) for t in range(0, 60, 5)]
    agent = ScriptedAgent((0, lines(wire.Watch(100, fenced=True))), *renewals, (60, EOF))
    agent.serve(Guard(kills))
    assert agent.written == []
    assert kills.groups == [100], "killed only when the agent went away"


def test_no_lease_lifts_the_deadline():
    guard = Guard(Kills())
    guard.handle(wire.Watch(100, fenced=True), now=0)
    guard.handle(wire.Lease(1.0), now=0)
    guard.handle(wire.NoLease(), now=0.5)
    assert guard.expire(100) == ()
    assert guard.wait_limit(100) is None


def test_once_the_lease_is_out_a_new_fenced_group_dies_at_once():
    kills = Kills()
    guard = Guard(kills)
    guard.handle(wire.Lease(1.0), now=0)
    assert guard.handle(wire.Watch(100), now=2) == ()
    assert guard.handle(wire.Watch(200, fenced=True), now=2) == (200,)
    assert guard.handle(wire.Lease(1.0), now=2) == ()
    assert guard.handle(wire.Watch(300, fenced=True), now=2.5) == ()
    assert kills.groups == [200]


def test_a_lease_of_zero_kills_the_fenced_groups_at_once():
    guard = Guard(Kills())
    guard.handle(wire.Watch(100, fenced=True), now=0)
    assert guard.handle(wire.Lease(0.0), now=5) == (100,)


def test_a_fenced_group_already_gone_is_forgotten_but_not_reported():
    agent = ScriptedAgent((0, lines(wire.Watch(100, fenced=True), wire.Watch(101, fenced=True),
                                    wire.Lease(1.0))), (5, EOF))
    agent.serve(Guard(Kills(101)))
    assert agent.written == [b"fenced 100\n"]


def test_sleeps_are_bounded_while_a_lease_runs_out():
    """A suspended machine's poll does not count the suspend: short sleeps, a boot-time clock."""
    agent = ScriptedAgent((0, lines(wire.Watch(100, fenced=True), wire.Lease(2.5))), (10, EOF))
    agent.serve(Guard(Kills()))
    assert agent.rests == [REST]
    assert agent.waits[1:4] == [MAX_WAIT, MAX_WAIT, pytest.approx(0.5 - REST)]
    assert agent.waits[4] is None, "nothing fenced is left: back to sleeping until the agent speaks"


def test_lines_that_come_while_it_rests_are_read_at_once():
    """The rest after each read: one wake-up for many tasks' lines, not two per task."""
    kills = Kills()
    arrivals = [(n * 0.001, lines(wire.Watch(1000 + n), wire.Forget(1000 + n))) for n in range(40)]
    agent = ScriptedAgent(*arrivals, (1, lines(wire.Watch(7))), (2, EOF))
    agent.serve(Guard(kills))
    assert len(agent.rests) == 3, "the first task, the 39 that came while it rested, the last"
    assert kills.groups == [7]


def test_a_rest_never_oversleeps_the_lease():
    kills = Kills()
    agent = ScriptedAgent((0, lines(wire.Watch(100, fenced=True), wire.Lease(0.01))), (5, EOF))
    agent.serve(Guard(kills))
    assert agent.rests == [pytest.approx(0.01)]
    assert agent.written == [b"fenced 100\n"]


def test_the_watchdogs_clock_counts_time_suspended_where_it_can():
    if hasattr(watchdog_main.time, "CLOCK_BOOTTIME"):
        assert watchdog_main.clock is watchdog_main._boottime


# -- the program itself

def test_a_group_that_is_gone_is_no_error():
    assert watchdog_main.kill_group(_a_pgid_nobody_uses()) is False


def _a_pgid_nobody_uses() -> int:
    child = subprocess.Popen(["true"], process_group=0)
    child.wait()
    return child.pid  # its group died with it (a new process may reuse it: unlikely here)


@pytest.fixture
def program(tmp_path):
    """The real watchdog program, started as the agent would (its stdin a pipe),
    with a stray inheritable descriptor and a working directory of its own."""
    stray = os.open(tmp_path, os.O_RDONLY)
    os.set_inheritable(stray, True)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "agent.runner.watchdog_main"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tmp_path,
                                env=dict(os.environ, PYTHONPATH=str(REPO)), process_group=0,
                                close_fds=False)
    finally:
        os.close(stray)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _eventually(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _ignores(pid: int, sig: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        ignored = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
    return bool(ignored & (1 << (sig - 1)))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_the_program_shrugs_off_termination_signals_and_exits_on_bye(program, sig):
    assert _eventually(lambda: _ignores(program.pid, sig)), "it never ignored the signal"
    program.send_signal(sig)
    program.stdin.write(b"bye\n")
    program.stdin.flush()
    assert program.wait(10) == 0


def test_the_program_keeps_only_its_three_pipes_and_leaves_the_directory(program):
    assert _eventually(lambda: os.readlink(f"/proc/{program.pid}/cwd") == "/")
    assert _eventually(lambda: sorted(map(int, os.listdir(f"/proc/{program.pid}/fd"))) == [0, 1, 2])
    program.stdin.close()
    assert program.wait(10) == 0, "its stdin ended: the agent is gone, and it exits"
