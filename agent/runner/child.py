"""A task's child started with posix_spawn, read and reaped without Twisted's Process.

Twisted's Process serves every kind of child (stdin pipes, ptys, any
descriptor map) and learns of an exit from SIGCHLD by calling waitpid on
every child it knows: with a thousand tasks running, a thousand system calls
(and Python calls) per SIGCHLD. A task needs less: its output pipes, read a
megabyte at a time, and its exit. SpawnedChild hands the same callbacks to
its ProcessProtocol as Process does (makeConnection, childDataReceived,
childConnectionLost, processExited, processEnded), so TaskProcess works with
either; on SIGCHLD one sweep for all of them asks the kernel which children
have exited (waitid), so an exit costs a system call or two whatever else runs.

A pidfd per child would tell the same without SIGCHLD, but it is one more
descriptor per running task, exactly when they run short: 10,000 tasks
started at once (tests/e2e/test_load.py) already take the agent to 19,000 of
its 20,000.
"""
from __future__ import annotations

import fcntl
import os
from typing import Mapping, Sequence

from twisted.internet import error
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger
from twisted.python.failure import Failure

from agent._twisted_compat import hook_sigchld, twisted_reaps
from agent.fdlimit import made_despite_a_hold
from agent.runner import cspawn
from agent.runner.spawner import (BUSY, Spawner, existing_spawner, is_unknown_child,
                                  spawner_for)

READ_CHUNK = 1 << 20
"""Bytes taken from a pipe per read; Twisted's stock reader takes 8 KiB."""

PIPE_SIZE = 1 << 20
"""Kernel buffer asked for an output pipe its writer fills, so a fast writer blocks less."""

DEFAULT_PIPE_SIZE = 1 << 16
"""Linux's pipe capacity: a read this large means the writer had filled the pipe."""

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

LOST_STATUS = 255 << 8
"""The wait status reported when a child's real one is lost: exit status 255."""

log = Logger()

_watched: dict[int, "SpawnedChild"] = {}
"""pid -> the child not yet reaped: the agent's tasks that Twisted does not reap itself."""


def is_task_child(pid: int) -> bool:
    """A task the agent started (a child it reaps itself or Twisted reaps), as opposed
    to something that left a task's group and was re-parented to the agent."""
    return pid in _watched or is_unknown_child(pid) or twisted_reaps(pid)


def grow_pipe(fd: int) -> None:
    """Ask for a PIPE_SIZE buffer once a writer has filled the pipe.

    Growing every pipe at once would charge each task 2 MiB of pipe buffers
    to the agent's user, whatever it writes: 1000 quiet tasks would hold
    2 GiB against fs.pipe-user-pages-soft (64 MiB), past which Linux gives
    an unprivileged user's new pipes two pages.
    """
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # over fs.pipe-max-size or the user's pipe quota, or not Linux: keep it


def read_output(fd: int, grown: bool) -> tuple[bytes | None, bool]:
    """One read of a task's output pipe, READ_CHUNK at most: (data, grown). data is None
    when nothing is there yet and b"" at the end; a read that fails raises OSError.
    The first read that finds the pipe full grows it (grow_pipe)."""
    try:
        data = os.read(fd, READ_CHUNK)
    except BlockingIOError:
        return None, grown
    if not grown and len(data) >= DEFAULT_PIPE_SIZE:
        grow_pipe(fd)
        grown = True
    return data, grown


def process_reason(status: int) -> BaseException:
    """A wait status as Twisted reports it: ProcessDone, or ProcessTerminated."""
    if os.WIFEXITED(status):
        code, sig = os.WEXITSTATUS(status), None
    else:
        code, sig = None, os.WTERMSIG(status)
    if code or sig:
        return error.ProcessTerminated(code, sig, status)
    return error.ProcessDone(status)


class _Pipe:
    """The read end of one of the child's output pipes, registered with the reactor."""

    __slots__ = ("child", "child_fd", "fd", "grown")

    def __init__(self, child: "SpawnedChild", child_fd: int, fd: int):
        self.child, self.child_fd, self.fd, self.grown = child, child_fd, fd, False

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "task"

    def doRead(self):
        try:
            data, self.grown = read_output(self.fd, self.grown)
        except OSError:
            data = b""  # a pipe that fails to read is done
        if data:
            self.child.received(self.child_fd, data)
        elif data is not None:
            self.child.pipe_closed(self)
        return None

    def connectionLost(self, reason) -> None:
        """The reactor let go of it (it is stopping)."""
        self.child.pipe_closed(self)


class _ExitSweep:
    """Stands, among the handlers Twisted's SIGCHLD handling calls, for every SpawnedChild."""

    def reapProcess(self) -> None:
        """Reap each child that has exited, found by asking the kernel (waitid, not
        reaping) rather than asking each child in turn."""
        while _watched:
            try:
                found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return  # no children at all
            child = None if found is None else _watched.get(found.si_pid)
            if child is not None:
                child.reapProcess()
            if child is None or child.status is None:
                if found is not None:  # someone else's zombie waits first: ask each of ours
                    for child in list(_watched.values()):
                        child.reapProcess()
                return


_SWEEP = _ExitSweep()


class SpawnedChild:
    """The transport of one task whose child posix_spawn started (see module)."""

    def __init__(self, reactor, protocol):
        self._reactor = reactor
        self.pid: int | None = None
        """None while the child is being started (agent.runner.spawner)."""
        self.status: int | None = None
        self.proto = protocol
        self.pipes: dict[int, _Pipe] = {}
        self._write_fds: list[int] = []

    def make_pipes(self, child_fds: Mapping[int, object]) -> dict[int, int]:
        """A pipe for each child descriptor marked "r"; the child's fd map (child fd ->
        the agent's fd to give it). The agent's read ends are non-blocking."""
        fd_map: dict[int, int] = {}
        try:
            for child_fd, target in child_fds.items():
                if target == "r":
                    read_end, write_end = made_despite_a_hold(os.pipe)
                    self.pipes[child_fd] = _Pipe(self, child_fd, read_end)
                    self._write_fds.append(write_end)
                    fd_map[child_fd] = write_end
                    fcntl.fcntl(read_end, fcntl.F_SETFL, os.O_NONBLOCK)  # a read end's only flag
                else:
                    fd_map[child_fd] = target
        except BaseException:
            self.drop_pipes()
            raise
        return fd_map

    def started(self, pid: int) -> None:
        """The child runs: read its output, watch for its exit, tell the protocol."""
        self._close_write_ends()
        self.pid = pid
        for pipe in self.pipes.values():
            self._reactor.addReader(pipe)
        _watched[pid] = self
        hook_sigchld(_SWEEP)
        self.proto.makeConnection(self)
        if not self.pipes:
            self.reapProcess()  # no EOF will come: it may have exited already

    def not_started(self, error: BaseException) -> None:
        """The spawn failed on the spawn thread: let go of the pipes, tell the protocol."""
        self.drop_pipes()
        proto, self.proto = self.proto, None
        proto.start_failed(error)

    def drop_pipes(self) -> None:
        """Close both ends of every pipe made for a child that was never started."""
        self._close_write_ends()
        pipes, self.pipes = self.pipes, {}
        for pipe in pipes.values():
            os.close(pipe.fd)

    def _close_write_ends(self) -> None:
        fds, self._write_fds = self._write_fds, []
        for fd in fds:
            os.close(fd)

    # -- the exit

    def reapProcess(self) -> None:
        """waitpid without blocking; report the exit if the child is gone. Called on
        SIGCHLD (by the sweep) and when the last pipe closes."""
        if self.status is not None:
            return
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # pragma: no cover - only if something else reaped it
            log.error("task pid {pid} was reaped by someone else: its exit status is lost",
                      pid=self.pid)
            pid, status = self.pid, LOST_STATUS
        if pid:
            self._reaped(status)

    def _reaped(self, status: int) -> None:
        self.status = status
        _watched.pop(self.pid, None)
        if self.proto is not None:
            self.proto.processExited(Failure(process_reason(status)))
        self._maybe_ended()

    # -- the pipes

    def received(self, child_fd: int, data: bytes) -> None:
        if self.proto is not None:
            self.proto.childDataReceived(child_fd, data)

    def pipe_closed(self, pipe: _Pipe) -> None:
        if self.pipes.get(pipe.child_fd) is not pipe:
            return
        del self.pipes[pipe.child_fd]
        self._reactor.removeReader(pipe)
        os.close(pipe.fd)
        if self.proto is not None:
            self.proto.childConnectionLost(pipe.child_fd)
        if not self.pipes:
            self.reapProcess()  # EOF on the last pipe: usually the child has just exited
        self._maybe_ended()

    def loseConnection(self) -> None:
        """Stop reading the child's output (what is left in the pipes is dropped)."""
        for pipe in list(self.pipes.values()):
            self.pipe_closed(pipe)

    def _maybe_ended(self) -> None:
        if self.pipes or self.status is None or self.proto is None:
            return
        proto, self.proto = self.proto, None
        proto.processEnded(Failure(process_reason(self.status)))


def spawn_child(reactor, protocol, executable: str, argv: Sequence[str], environment,
                child_fds: Mapping[int, object], spawn, reset_signals: Sequence[int]) -> SpawnedChild:
    """Start a child as its own process group's leader, with a pipe for each child
    descriptor marked "r" and the others mapped as given; raise OSError if it cannot
    start inline (ValueError if exec could not take its arguments).

    spawn(executable, argv, environment, fd_map, reset_signals) starts it inline
    (posix_spawnp with a new group, see agent.runner.spawn) and returns its pid.
    When the agent is busy and ctypes can make the call, the spawn thread makes it
    instead (agent.runner.spawner): the protocol is told through awaiting_spawn,
    then makeConnection or start_failed.
    """
    child = SpawnedChild(reactor, protocol)
    spawner = _busy_spawner(reactor)
    if spawner is not None:
        job = _ThreadStart(child, executable, argv, environment, child_fds, reset_signals)
        protocol.awaiting_spawn(job)
        spawner.submit(job)
        return child
    fd_map = child.make_pipes(child_fds)
    try:
        pid = spawn(executable, argv, environment, fd_map, reset_signals)
    except BaseException:
        child.drop_pipes()
        raise
    child.started(pid)
    return child


class _ThreadStart:
    """A child to be started on the spawn thread: its pipes are made only when the thread
    is about to take it, so a thousand waiting starts hold no descriptor."""

    __slots__ = ("child", "executable", "argv", "environment", "child_fds", "reset_signals",
                 "handed", "dropped")

    def __init__(self, child: SpawnedChild, executable, argv, environment, child_fds,
                 reset_signals):
        self.child, self.executable, self.argv = child, executable, argv
        self.environment, self.child_fds, self.reset_signals = environment, child_fds, reset_signals
        self.handed = self.dropped = False

    def prepare(self) -> cspawn.Prepared:
        """The pipes and the C arguments, as the thread is about to take it (on the reactor)."""
        self.handed = True
        fd_map = self.child.make_pipes(self.child_fds)
        try:
            return cspawn.prepare(self.executable, self.argv, self.environment, fd_map,
                                  self.reset_signals)
        except BaseException:
            self.child.drop_pipes()
            raise

    def spawned(self, pid: int | None, error: BaseException | None) -> None:
        """The spawn thread's answer, on the reactor."""
        if pid is None:
            self.child.not_started(error)
        else:
            self.child.started(pid)

    def drop(self) -> bool:
        """Start nothing after all, if the thread has not taken it yet; True if so."""
        if self.handed or self.dropped:
            return False
        self.dropped = True
        self.child.proto = None
        return True


def _busy_spawner(reactor) -> Spawner | None:
    """The spawn thread, when it can take the spawn and the agent is busy enough to gain."""
    if not cspawn.available:
        return None
    spawner = existing_spawner(reactor)  # asked first: an interface check costs more, per spawn
    if spawner is not None:
        return spawner if spawner.queued or len(_watched) >= BUSY else None  # never inline
    if len(_watched) >= BUSY and IReactorThreads.providedBy(reactor):  # beside its spawns
        return spawner_for(reactor)
    return None
