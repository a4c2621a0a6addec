"""The agent's side of the watchdog, on a Clock with a stand-in process: what it says, and when."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from twisted.internet import error
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from agent.runner import watchdog_wire as wire
from agent.runner.watchdog import FORGET_DELAY, RESTART_INTERVAL, STOP_TIMEOUT, Watchdog


class FakeWriter:
    def __init__(self):
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(data)

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)

    def close(self) -> None:
        self.closed = True

    @property
    def lines(self) -> list[str]:
        return self.data.decode().splitlines()


class FakeTransport:
    def __init__(self, pid: int):
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class Launcher:
    """Stands in for launch_process: each start a new pid, a new writer."""

    def __init__(self):
        self.started: list[tuple[object, FakeTransport, FakeWriter]] = []
        self.fail_with: OSError | None = None

    def __call__(self, reactor, protocol):
        if self.fail_with is not None:
            raise self.fail_with
        transport = FakeTransport(9000 + len(self.started))
        protocol.makeConnection(transport)
        writer = FakeWriter()
        self.started.append((protocol, transport, writer))
        return transport, writer

    @property
    def protocol(self):
        return self.started[-1][0]

    @property
    def writer(self) -> FakeWriter:
        return self.started[-1][2]

    def die(self) -> None:
        self.protocol.processEnded(Failure(error.ProcessTerminated(signal=9)))

    def exit(self) -> None:
        self.protocol.processEnded(Failure(error.ProcessDone(0)))


@pytest.fixture
def clock():
    clock = Clock()
    clock.advance(1000)
    return clock


@pytest.fixture
def launcher():
    return Launcher()


@pytest.fixture
def logged():
    with capturedLogs() as events:
        yield events


def started(clock, launcher) -> Watchdog:
    watchdog = Watchdog(clock, launch=launcher)
    watchdog.start()
    return watchdog


def task(state: str = "running", pid: int | None = 500, source: str = "tcp", finished=False):
    runner = None if pid is False else SimpleNamespace(pid=pid, finished=finished)
    return SimpleNamespace(state=state, runner=runner, source=source)


def _text(event: dict) -> str:
    return formatEvent(event)


# -- what the engine tells

def test_a_running_task_is_watched_and_a_fleet_task_fenced(clock, launcher):
    watchdog = started(clock, launcher)
    watchdog.observe(task(pid=500))
    watchdog.observe(task(pid=501, source="fleet"))
    assert launcher.writer.lines == ["watch 500", "watch 501 fenced"]
    assert watchdog.watched == {500: False, 501: True}


@pytest.mark.parametrize("observed", [
    task(state="queued", pid=False),
    task(state="finished", pid=500),
    task(pid=None),  # could not start
    task(pid=500, finished=True),  # ended as it started
])
def test_a_task_without_a_running_group_is_not_watched(clock, launcher, observed):
    watchdog = started(clock, launcher)
    watchdog.observe(observed)
    assert launcher.writer.data == b""


def test_a_group_is_forgotten_once_its_cleanup_is_known(clock, launcher):
    watchdog = started(clock, launcher)
    running = task(pid=500)
    watchdog.observe(running)
    watchdog.observe_cleanup(running)
    assert watchdog.watched == {}
    assert launcher.writer.lines == ["watch 500"], "a forget may wait a little"
    clock.advance(FORGET_DELAY)
    assert launcher.writer.lines == ["watch 500", "forget 500"]
    assert clock.getDelayedCalls() == []


def test_a_watch_is_written_at_once_and_takes_the_waiting_forgets_along(clock, launcher):
    watchdog = started(clock, launcher)
    for pid in (500, 501):
        watchdog.observe(task(pid=pid))
        watchdog.observe_cleanup(task(pid=pid))
    assert launcher.writer.writes == [b"watch 500\n", b"forget 500\nwatch 501\n"]
    assert clock.getDelayedCalls()[0].getTime() == clock.seconds() + FORGET_DELAY


def test_a_new_group_with_a_forgotten_ones_number_is_not_forgotten(clock, launcher):
    watchdog = started(clock, launcher)
    watchdog.watch(500)
    watchdog.forget(500)
    watchdog.watch(500, fenced=True)  # the kernel gave the number to a new task
    clock.advance(FORGET_DELAY)
    assert launcher.writer.lines == ["watch 500", "watch 500 fenced"]
    assert watchdog.watched == {500: True}


def test_a_group_never_watched_is_not_forgotten_aloud(clock, launcher):
    watchdog = started(clock, launcher)
    watchdog.observe_cleanup(task(pid=None))
    watchdog.observe_cleanup(task(pid=777))
    assert launcher.writer.data == b""


def test_the_fencing_rule_is_the_constructors(clock, launcher):
    watchdog = Watchdog(clock, launch=launcher, fenced=lambda t: t.source == "http")
    watchdog.start()
    watchdog.observe(task(pid=500, source="http"))
    assert launcher.writer.lines == ["watch 500 fenced"]


def test_the_lease_and_its_end_are_passed_on(clock, launcher):
    watchdog = started(clock, launcher)
    watchdog.lease(15)
    watchdog.no_lease()
    assert launcher.writer.lines == ["lease 15.0", "no-lease"]


@pytest.mark.parametrize("call", [lambda w: w.watch(0), lambda w: w.watch(1),
                                  lambda w: w.lease(-1), lambda w: w.lease(float("nan"))])
def test_nonsense_is_refused_before_it_reaches_the_pipe(clock, launcher, call):
    watchdog = started(clock, launcher)
    with pytest.raises(wire.BadMessage):
        call(watchdog)
    assert launcher.writer.data == b""


# -- what the watchdog says

def test_fenced_groups_reported_are_forgotten_and_logged(clock, launcher, logged):
    watchdog = started(clock, launcher)
    watchdog.watch(500, fenced=True)
    watchdog.watch(600)
    launcher.protocol.outReceived(b"fen")
    launcher.protocol.outReceived(b"ced 500\n")
    assert watchdog.watched == {600: False}
    warnings = [_text(e) for e in logged if e.get("log_level").name == "warn"]
    assert warnings == ["the lease ran out: the watchdog killed fenced task group(s) [500]"]


def test_trouble_and_stderr_are_logged_as_errors(clock, launcher, logged):
    started(clock, launcher)
    launcher.protocol.outReceived(b"error not a watchdog message: b'x'\nnonsense\n")
    launcher.protocol.errReceived(b"Traceback (most recent call last):\n")
    errors = [_text(e) for e in logged if e.get("log_level").name == "error"]
    assert errors == ["watchdog could not read the agent: not a watchdog message: b'x'",
                      "watchdog: not a watchdog report: b'nonsense'",
                      "watchdog 9000 wrote to stderr: Traceback (most recent call last):"]


# -- when the watchdog dies

def test_a_watchdog_that_dies_is_replaced_and_told_everything(clock, launcher, logged):
    watchdog = started(clock, launcher)
    watchdog.watch(500)
    watchdog.watch(501, fenced=True)
    watchdog.lease(30)
    clock.advance(20)
    watchdog.watch(502)
    watchdog.forget(502)
    launcher.die()
    clock.advance(0)
    assert len(launcher.started) == 2, "started again at once: the last start was long ago"
    assert launcher.writer.writes == [b"watch 500\nwatch 501 fenced\nlease 10.0\n"]
    assert clock.getDelayedCalls() == [], "nothing left to forget"
    assert launcher.started[0][2].closed
    errors = [_text(e) for e in logged if e.get("log_level").name == "error"]
    assert errors == ["watchdog 9000 ended (A process has ended with a probable error "
                      "condition: process ended by signal 9.); starting another"]
    assert watchdog.starts == 2


def test_a_lease_already_out_is_passed_on_as_out(clock, launcher):
    watchdog = started(clock, launcher)
    watchdog.lease(5)
    clock.advance(60)
    launcher.die()
    clock.advance(0)
    assert launcher.writer.lines == ["lease 0.0"]


def test_a_watchdog_that_keeps_dying_is_restarted_at_most_once_a_second(clock, launcher):
    started(clock, launcher)
    clock.advance(0.25)
    launcher.die()
    assert len(launcher.started) == 1
    clock.advance(RESTART_INTERVAL - 0.25 - 0.01)
    assert len(launcher.started) == 1
    clock.advance(0.01)
    assert len(launcher.started) == 2


def test_a_watchdog_that_cannot_start_is_tried_again(clock, launcher, logged):
    launcher.fail_with = OSError(2, "No such file or directory")
    watchdog = started(clock, launcher)
    assert watchdog.starts == 0
    assert any("cannot start the watchdog" in _text(e) for e in logged)
    launcher.fail_with = None
    watchdog.watch(500)  # remembered while there is no watchdog to tell
    clock.advance(RESTART_INTERVAL)
    assert watchdog.starts == 1
    assert launcher.writer.lines == ["watch 500"]


def test_an_old_watchdogs_end_changes_nothing(clock, launcher):
    watchdog = started(clock, launcher)
    old = launcher.protocol
    clock.advance(5)
    launcher.die()
    clock.advance(0)
    old.processEnded(Failure(error.ProcessDone(0)))  # reported twice: ignored
    assert watchdog.starts == 2
    assert clock.getDelayedCalls() == []


# -- stopping

def test_a_clean_stop_says_bye_and_waits_for_the_exit(clock, launcher):
    watchdog = started(clock, launcher)
    watchdog.watch(500)
    stopped = []
    watchdog.stop().addCallback(stopped.append)
    assert launcher.writer.lines == ["watch 500", "bye"]
    assert launcher.writer.closed
    watchdog.forget(500)  # a late cleanup: nothing more is written
    assert stopped == []
    launcher.exit()
    assert stopped == [None]
    assert watchdog.starts == 1, "an exit after bye is no reason to start another"
    assert clock.getDelayedCalls() == []


def test_a_watchdog_that_will_not_exit_after_bye_is_killed(clock, launcher):
    watchdog = started(clock, launcher)
    stopped = []
    watchdog.stop().addCallback(stopped.append)
    clock.advance(STOP_TIMEOUT)
    assert launcher.started[0][1].signals == ["KILL"]
    launcher.die()
    assert stopped == [None]


def test_stopping_while_waiting_to_restart_starts_nothing(clock, launcher):
    watchdog = started(clock, launcher)
    launcher.die()
    stopped = []
    watchdog.stop().addCallback(stopped.append)
    assert stopped == [None]
    clock.advance(10)
    assert clock.getDelayedCalls() == []
