"""SpawnedChild: a task's output and exit reported as Twisted's Process would, and
its exit found by one waitid sweep per SIGCHLD instead of a waitpid per task."""
from __future__ import annotations

import os
import signal
import time

import pytest_twisted
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol

from agent.runner import child as child_module
from agent.runner.child import SpawnedChild, _ExitSweep, is_task_child, spawn_child
from agent.runner.spawn import posix_spawn_group
from tests.procs import group_members, wait_until_empty

RESET = [signal.SIGPIPE]
"""Signals a child gets back at their default (the agent ignores SIGPIPE)."""


class Recorder(ProcessProtocol):
    """Every callback, in order; `ended` fires with the processEnded reason."""

    def __init__(self):
        self.events: list[tuple] = []
        self.ended: Deferred = Deferred()

    def connectionMade(self):
        self.events.append(("made", self.transport.pid))

    def childDataReceived(self, fd, data):
        self.events.append(("data", fd, data))

    def childConnectionLost(self, fd):
        self.events.append(("closed", fd))

    def processExited(self, reason):
        self.events.append(("exited", type(reason.value).__name__, reason.value.exitCode,
                            reason.value.signal))

    def processEnded(self, reason):
        self.events.append(("ended", type(reason.value).__name__))
        self.ended.callback(reason.value)

    def named(self, kind: str) -> list[tuple]:
        return [event for event in self.events if event[0] == kind]


def _spawn(argv, child_fds=None):
    from twisted.internet import reactor
    protocol = Recorder()
    child = spawn_child(reactor, protocol, argv[0], argv, dict(os.environb),
                        child_fds or {1: "r", 2: "r"}, posix_spawn_group, RESET)
    return child, protocol


def _open_fds() -> set[int]:
    return set(map(int, os.listdir("/proc/self/fd")))


def _is_zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest_twisted.ensureDeferred
async def test_output_exit_and_end_come_as_twisted_reports_them():
    child, protocol = _spawn(["sh", "-c", "echo out; echo err >&2; exit 3"])
    reason = await protocol.ended
    assert protocol.events[0] == ("made", child.pid)
    assert sorted(protocol.named("data")) == [("data", 1, b"out\n"), ("data", 2, b"err\n")]
    assert sorted(protocol.named("closed")) == [("closed", 1), ("closed", 2)]
    assert protocol.named("exited") == [("exited", "ProcessTerminated", 3, None)]
    assert protocol.events[-1] == ("ended", "ProcessTerminated") and reason.exitCode == 3
    assert not is_task_child(child.pid), "reaped, and forgotten"
    assert not os.path.exists(f"/proc/{child.pid}"), "no zombie left"


@pytest_twisted.ensureDeferred
async def test_a_clean_exit_is_process_done_and_a_signal_is_named():
    _, done = _spawn(["true"])
    assert isinstance(await done.ended, error.ProcessDone)
    _, killed = _spawn(["sh", "-c", "kill -9 $$"])
    reason = await killed.ended
    assert (type(reason), reason.signal) == (error.ProcessTerminated, signal.SIGKILL)


@pytest_twisted.ensureDeferred
async def test_the_child_leads_its_own_group_and_leaves_no_descriptor_behind():
    before = _open_fds()
    child, protocol = _spawn(["sh", "-c", "ps -o pgid= -p $$"])
    await protocol.ended
    assert int(protocol.named("data")[0][2]) == child.pid != os.getpgid(0)
    assert _open_fds() <= before


@pytest_twisted.ensureDeferred
async def test_an_exit_while_a_grandchild_holds_stdout_is_reported_before_the_end():
    child, protocol = _spawn(["sh", "-c", "sleep 30 & exit 0"])
    deadline = time.monotonic() + 10
    while not protocol.named("exited") and time.monotonic() < deadline:
        child_module._SWEEP.reapProcess()  # what SIGCHLD does
        await _later(0.02)
    assert protocol.named("exited") == [("exited", "ProcessDone", 0, None)]
    assert not protocol.named("ended"), "the grandchild still holds the pipes"
    os.killpg(child.pid, signal.SIGKILL)
    child.loseConnection()
    await protocol.ended
    assert not wait_until_empty(group_members, child.pid)


def test_a_child_that_cannot_start_leaves_no_descriptor_behind():
    before = _open_fds()
    protocol = Recorder()
    try:
        spawn_child(None, protocol, "/nonexistent/prog", ["/nonexistent/prog"], {},
                    {1: "r", 2: "r"}, posix_spawn_group, RESET)
    except FileNotFoundError:
        pass
    else:
        raise AssertionError("the spawn should have failed")
    assert _open_fds() == before and protocol.events == []


def test_the_sweep_reaps_exited_children_without_asking_each():
    """One waitid finds who exited; the others, still running, are not asked."""
    reactor = _Reactor()
    quick = _started(reactor, ["true"])
    asked = []
    slow = _started(reactor, ["sleep", "30"])
    slow.reapProcess = lambda: asked.append(slow.pid)
    try:
        _wait_until(lambda: _is_zombie_or_gone(quick.pid))
        _ExitSweep().reapProcess()
        assert quick.status == 0 and asked == []
        assert not os.path.exists(f"/proc/{quick.pid}")
    finally:
        os.kill(slow.pid, signal.SIGKILL)
        os.waitpid(slow.pid, 0)
        child_module._watched.pop(slow.pid, None)
        quick.loseConnection()
        slow.loseConnection()


def test_a_strangers_zombie_first_in_line_makes_the_sweep_ask_each_of_ours():
    stranger = os.posix_spawnp("true", ["true"], os.environ)  # a child that is not a task
    _wait_until(lambda: _is_zombie_or_gone(stranger))
    ours = _started(_Reactor(), ["true"])
    try:
        _wait_until(lambda: _is_zombie_or_gone(ours.pid))
        _ExitSweep().reapProcess()
        assert ours.status == 0, "reaped although the stranger's zombie came first"
        assert _is_zombie_or_gone(stranger) and os.path.exists(f"/proc/{stranger}"), \
            "the stranger is left to whoever owns it"
    finally:
        os.waitpid(stranger, 0)
        ours.loseConnection()


class _Reactor:
    """Just enough of IReactorFDSet for SpawnedChild's pipes."""

    def __init__(self):
        self.readers = set()

    def addReader(self, reader):
        self.readers.add(reader)

    def removeReader(self, reader):
        self.readers.discard(reader)


def _started(reactor, argv) -> SpawnedChild:
    """A child with its stdout on a pipe, started."""
    child = SpawnedChild(reactor, Recorder())
    fd_map = child.make_pipes({1: "r"})
    child.started(posix_spawn_group(argv[0], argv, os.environ, fd_map, RESET))
    return child


def _wait_until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _later(seconds: float) -> Deferred:
    from twisted.internet import reactor, task
    return task.deferLater(reactor, seconds, lambda: None)
