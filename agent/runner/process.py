"""The runner: one child process group, its output, its timeout, its end.

A TaskProcess knows nothing of JSON, HTTP or SQL. It hands every chunk of
output to a sink, enforces the timeout with clock.callLater, kills the whole
group when the agent ends the task, and fires `ended` exactly once with an
Outcome.
"""
from __future__ import annotations

import os
import signal
from typing import Callable, Mapping, Protocol, Sequence

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from agent.core.outcome import Ending, Outcome, signal_name
from agent.runner.child import is_task_child
from agent.runner.spawner import may_reap_strangers
from agent.runner.spawn import spawn_in_group

DRAIN_GRACE = 0.5
"""Seconds to keep reading after the main process exits while something it
left behind still holds stdout open; then the group is killed."""

CLEANUP_DEADLINE = 5.0
"""Seconds to keep SIGKILLing a task's group before reporting it cannot be emptied."""

CLEANUP_POLL = 0.05

TIMEOUT_ERROR = "timeout exceeded"
OUTPUT_LIMIT_ERROR = "output limit exceeded"

log = Logger()


class OutputSink(Protocol):
    def received(self, fd: int, data: bytes) -> None: ...


def _killpg(pgid: int, sig: int) -> bool:
    """Signal the group; False when no process is left in it, not even a zombie."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False  # the group is already empty
    except PermissionError:
        pass  # someone is in it, even if we may not signal them
    return True


def _reap_leftovers(pgid: int) -> None:
    """Reap the group's members that are the agent's zombie children but not its task.

    The agent is a child subreaper (agent.runner.escapees), so what a task leaves in
    its group when its leader exits becomes the agent's child, and a zombie
    still counts as a member of the group until its parent reaps it. The
    leader itself is the runner's to reap: on meeting it, stop; and while the spawn
    thread may have started a child the runner does not know yet, reap nothing
    (the group then still looks alive, and the check comes back).
    """
    if not may_reap_strangers():
        return
    while True:
        try:
            found = os.waitid(os.P_PGID, pgid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return  # none of the group's members is the agent's child
        if found is None or is_task_child(found.si_pid):
            return
        try:
            os.waitpid(found.si_pid, os.WNOHANG)
        except ChildProcessError:
            return


def _group_alive(pgid: int) -> bool:
    _reap_leftovers(pgid)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone is in the group, even if we may not signal them
    return True


def verify_group_empty(clock, pgid: int, killpg=_killpg, group_alive=_group_alive,
                       deadline: float = CLEANUP_DEADLINE) -> Deferred[bool]:
    """Fire True once no process is left in the group, False if one survives
    `deadline` seconds of repeated SIGKILL (reported, never silently forgotten).

    Members may linger for a moment as zombies waiting for a reaper, hence the poll.
    """
    watch = _GroupWatch(clock, pgid, killpg, group_alive, clock.seconds() + deadline)
    watch.check()
    return watch.result


class _GroupWatch:
    """One group's poll, as an object rather than a self-referencing closure:
    thousands of tasks a second must not leave reference cycles for the GC."""

    def __init__(self, clock, pgid: int, killpg, group_alive, give_up_at: float):
        self.result: Deferred[bool] = Deferred()
        self._clock, self._pgid, self._give_up_at = clock, pgid, give_up_at
        self._killpg, self._group_alive = killpg, group_alive

    def check(self) -> None:
        if not self._group_alive(self._pgid):
            self.result.callback(True)
        elif self._clock.seconds() >= self._give_up_at:
            self.result.callback(False)
        else:
            self._killpg(self._pgid, signal.SIGKILL)
            self._clock.callLater(CLEANUP_POLL, self.check)


class TaskProcess(ProcessProtocol):
    """Runs one child in its own process group and fires `ended` with an Outcome."""

    def __init__(self, clock, sink: OutputSink, timeout: float | None = None,
                 output_limit: int | None = None, drain_grace: float = DRAIN_GRACE,
                 killpg: Callable[[int, int], bool | None] = _killpg,
                 group_alive: Callable[[int], bool] = _group_alive, argv0: str = "?"):
        self._clock = clock
        self._argv0 = argv0
        self._sink = sink
        self._timeout = timeout
        self._stdout_left = output_limit
        self._drain_grace = drain_grace
        self._killpg = killpg
        self._group_alive = group_alive
        self._timers: dict[str, object] = {}
        self._exit_status: error.ProcessTerminated | error.ProcessDone | None = None
        self._forced: tuple[Ending, str] | None = None
        self.ended: Deferred[Outcome] = Deferred()
        self.spawned: Deferred[bool] = Deferred()
        """Fires True once the child runs and has its pid, False if it could not start."""
        self.cleaned: Deferred[bool] = Deferred()
        """Fires after `ended`: True once the task's group is verified empty."""
        self._start: object | None = None
        """A start waiting for the spawn thread (agent.runner.child), while it waits."""
        self._cancel_when_spawned: tuple[str, float] | None = None
        self.finished = False
        self.pid: int | None = None
        # The clock starts as the spawn begins: a short child may already be
        # reaped by the time connectionMade runs.
        self.started_at: float = clock.seconds()

    # -- the child's life, as Twisted reports it

    def awaiting_spawn(self, start) -> None:
        """The child is to be started on the spawn thread; start.drop() gives it up."""
        self._start = start

    def connectionMade(self):
        self.pid = self.transport.pid
        if self._start is not None:  # started on the thread, maybe after a wait: it runs now
            self._start = None
            self.started_at = self._clock.seconds()
        if self._timeout:
            self._arm("timeout", self._timeout, self._end_by_agent, Ending.TIMED_OUT, TIMEOUT_ERROR)
        self.spawned.callback(True)
        if self._cancel_when_spawned is not None:
            self.cancel(*self._cancel_when_spawned)

    def start_failed(self, error: Exception) -> None:
        """The child could not be started (the spawn thread's answer, agent.runner.spawner)."""
        self._never_started(Outcome.start_failed(_start_error(self._argv0, error)))

    def _never_started(self, outcome: Outcome) -> None:
        self._start = None
        if not self.finished:
            self.finished = True
            self.spawned.callback(False)
            self.ended.callback(outcome)
            self.cleaned.callback(True)

    def childDataReceived(self, fd, data):
        if self.finished:
            return
        if fd == 1 and self._stdout_left is not None:
            self._stdout_left -= len(data)
            if self._stdout_left < 0:
                self._sink.received(fd, data[:self._stdout_left])
                self._end_by_agent(Ending.OUTPUT_LIMIT, OUTPUT_LIMIT_ERROR)
                return
        self._sink.received(fd, data)

    def processExited(self, reason):
        self._exit_status = reason.value
        self._ended_at = self._clock.seconds()
        if not self.finished:
            self._arm("drain", self._drain_grace, self._stop_draining)

    def processEnded(self, reason):
        if self._exit_status is None:
            self.processExited(reason)
        self._finish()

    # -- the agent's side

    def cancel(self, error_message: str = "cancelled", grace: float = 0.0) -> None:
        """End the task: SIGTERM and SIGKILL after grace seconds, or SIGKILL now."""
        if self.finished:
            return
        if self.transport is None:  # waiting for the spawn thread
            if self._start is not None and self._start.drop():
                self._never_started(Outcome(Ending.CANCELLED, -1, error_message))
            else:  # the thread has it: as soon as it runs
                self._cancel_when_spawned = (error_message, grace)
            return
        if self._forced:  # already ending gracefully: a cancel without grace cuts it short
            if grace <= 0 and "kill" in self._timers:
                self._kill_and_finish()
            return
        if grace > 0 and self._exit_status is None:
            self._forced = (Ending.CANCELLED, error_message)
            self._signal_group(signal.SIGTERM)
            self._arm("kill", grace, self._kill_and_finish)
        else:
            self._end_by_agent(Ending.CANCELLED, error_message)

    def _end_by_agent(self, ending: Ending, message: str) -> None:
        self._forced = (ending, message)
        self._ended_at = self._clock.seconds()
        self._kill_and_finish()

    def _stop_draining(self) -> None:
        log.info("task pid {pid} exited but its group still held its output open; killing it",
                 pid=self.pid)
        self._kill_and_finish()

    def _kill_and_finish(self) -> None:
        self._signal_group(signal.SIGKILL)
        self._close_pipes()
        self._finish()

    # -- helpers

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        found = self._signal_group(signal.SIGKILL)  # nothing the task left behind outlives it
        self.ended.callback(self._outcome())
        if self.pid is None or found is False:  # the kill found no process: nothing to verify
            self.cleaned.callback(True)
        else:
            verify_group_empty(self._clock, self.pid, self._killpg,
                               self._group_alive).chainDeferred(self.cleaned)

    def _outcome(self) -> Outcome:
        duration_ms = (getattr(self, "_ended_at", self._clock.seconds()) - self.started_at) * 1000.0
        common = dict(pid=self.pid, started_at=self.started_at, duration_ms=max(duration_ms, 0.0))
        if self._forced:
            ending, message = self._forced
            return Outcome(ending, -1, message, **common)
        status = self._exit_status
        if getattr(status, "signal", None) is not None:
            number = status.signal
            return Outcome(Ending.SIGNALLED, 128 + number,
                           f"killed by signal {number} ({signal_name(number)})",
                           signal=number, **common)
        return Outcome(Ending.EXITED, status.exitCode or 0, "", **common)

    def _arm(self, name: str, delay: float, fn, *args) -> None:
        self._timers[name] = self._clock.callLater(delay, fn, *args)

    def _signal_group(self, sig: int) -> bool | None:
        """The killpg's answer: False when the group had no process left."""
        if self.pid is not None:
            return self._killpg(self.pid, sig)
        return None

    def _close_pipes(self) -> None:
        try:
            self.transport.loseConnection()
        except Exception:  # pragma: no cover - the pipes are gone already
            log.failure("closing pipes of pid {pid}", pid=self.pid)


_devnull_fd: int | None = None


def _devnull() -> int:
    """One /dev/null descriptor, opened on first use, serves every child's stdin."""
    global _devnull_fd
    if _devnull_fd is None:
        _devnull_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _devnull_fd


def start_task(reactor, argv: Sequence[str], sink: OutputSink, timeout: float | None = None,
               env: Mapping[str, str] | None = None, cwd: str | None = None,
               limits: Sequence[tuple[str, int]] = (), spawn=spawn_in_group,
               executable: str | None = None, **runner_options) -> TaskProcess:
    """Start argv; the returned runner's `ended` fires with the Outcome.

    executable: the file to run, when it is already resolved (the allow-list pins
    it); else argv[0]. A task that cannot start gets an Outcome at once
    (START_FAILED) whose error carries the operating system's reason.
    """
    runner = TaskProcess(reactor, sink, timeout, argv0=argv[0], **runner_options)
    spawn_options = {} if executable is None else {"executable": executable}
    try:
        spawn(reactor, runner, argv, env=env, cwd=cwd, child_fds={0: _devnull(), 1: "r", 2: "r"},
              limits=limits, **spawn_options)
    except (OSError, ValueError) as e:
        runner.start_failed(e)
    return runner


def _start_error(argv0: str, e: Exception) -> str:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return f"cannot start {argv0!r}: {reason}"
