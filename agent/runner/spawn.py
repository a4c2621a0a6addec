"""Start a child as the leader of its own process group.

A task that posix_spawnp can start (the usual one) gets pipes for its output
and posix_spawnp with a new process group, and is then read and watched by
agent.runner.child.SpawnedChild. posix_spawn cannot change directory or set
resource limits, so a task with its own cwd or limits takes Twisted's fork
path (GroupProcess); there an error pipe reports a failed exec as an OSError
in the parent, exactly like posix_spawnp does, so "could not start" is never
confused with a program that exited 1. Either way only the child's own
descriptors are mapped (Python opens everything else close-on-exec), so the
cost of a spawn does not grow with the thousands of descriptors the agent may hold.
"""
from __future__ import annotations

import errno
import os
import signal
from functools import partial
from typing import Mapping, Sequence

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None

from twisted.internet import process
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST

from agent._twisted_compat import environment_bytes, ignored_signals
from agent import fdlimit
from agent.runner.child import read_output, spawn_child

RLIMITS = {"cpu_s": ("RLIMIT_CPU", 1, 1), "memory_mb": ("RLIMIT_AS", 1 << 20, 0),
           "nofile": ("RLIMIT_NOFILE", 1, 0)}
"""Request limit name -> (resource constant, multiplier to the kernel's unit,
headroom of the hard limit over the soft one: a CPU hog gets SIGXCPU a second
before the kernel's SIGKILL, so it is reported as what it is)."""


class LimitsUnsupported(ValueError):
    """The platform cannot apply a requested resource limit."""


def resolve_limits(limits: Sequence[tuple[str, int]]) -> list[tuple[int, tuple[int, int]]]:
    """(resource, (soft, hard)) pairs for setrlimit; refuse what this platform lacks."""
    resolved = []
    for name, value in limits:
        constant, multiplier, headroom = RLIMITS[name]
        if resource is None or not hasattr(resource, constant):
            raise LimitsUnsupported(f"limits.{name} is not supported on this platform")
        soft = value * multiplier
        if soft + headroom > MAX_RLIMIT:
            raise LimitsUnsupported(f"limits.{name} = {value} is more than the kernel accepts")
        resolved.append((getattr(resource, constant), (soft, soft + headroom)))
    return resolved


MAX_RLIMIT = (1 << 63) - 1
"""The largest finite limit setrlimit takes here; beyond it the child's setrlimit would
fail after the fork, and the task would seem to have run and exited 1."""


class LargeChunkReader(process.ProcessReader):
    """Reads a child's pipe a megabyte at a time instead of 8 KiB, and grows the
    pipe once the child has filled it (agent.runner.child.read_output)."""

    _grown = False

    def doRead(self):
        try:
            data, self._grown = read_output(self.fd, self._grown)
        except OSError:
            return CONNECTION_LOST
        if data is None:
            return None
        if not data:
            return CONNECTION_DONE
        self.dataReceived(data)
        return None


class GroupProcess(process.Process):
    """A forked child that leads a new process group (pgid == pid), or a new session
    (and so a new group too) with new_session: for what posix_spawn cannot do (a
    working directory, resource limits, a session, signals ignored from the start)."""

    processReaderFactory = LargeChunkReader

    def __init__(self, *args, rlimits: Sequence[tuple[int, tuple[int, int]]] = (),
                 new_session: bool = False, ignore_signals: Sequence[int] = (), **kwargs):
        # setrlimit calls, setsid and ignored signals for the child, made after the
        # fork. Set before Process.__init__, which forks.
        self.rlimits = list(rlimits)
        self.new_session = new_session
        self.ignore_signals = list(ignore_signals)
        super().__init__(*args, **kwargs)

    def _trySpawnInsteadOfFork(self, path, uid, gid, executable, args, environment, kwargs):
        return False  # Twisted's own posix_spawnp would not start a new process group

    def _fork(self, path, uid, gid, executable, args, environment, **kwargs):
        report_r, report_w = os.pipe()
        self._exec_report_fd = report_w
        fdmap = {**kwargs.pop("fdmap"), report_w: report_w}
        try:
            super()._fork(path, uid, gid, executable, args, environment, fdmap=fdmap, **kwargs)
        except BaseException:
            os.close(report_r)
            raise
        finally:
            os.close(report_w)
        with os.fdopen(report_r, "rb") as report:
            failure = report.read()
        if failure:
            os.waitpid(self.pid, 0)
            code = int(failure)
            raise OSError(code, os.strerror(code), executable)

    def _setupChild(self, fdmap):
        if self.new_session:
            os.setsid()
        else:
            os.setpgid(0, 0)
        super()._setupChild(fdmap)  # which ends by giving every signal its default action
        for number in self.ignore_signals:  # SIG_IGN survives exec: no moment unprotected
            signal.signal(number, signal.SIG_IGN)

    def _execChild(self, path, uid, gid, executable, args, environment):
        os.set_inheritable(self._exec_report_fd, False)  # closed by a successful exec
        try:
            original = fdlimit.children_limit()
            if original is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, original)
            for limit, soft_and_hard in self.rlimits:  # a task's own nofile comes last and wins
                resource.setrlimit(limit, soft_and_hard)
            super()._execChild(path, uid, gid, executable, args, environment)
        except OSError as e:
            os.write(self._exec_report_fd, str(e.errno or errno.ENOEXEC).encode())
        except (ValueError, OverflowError):  # setrlimit: above the hard limit, or too large
            os.write(self._exec_report_fd, str(errno.EPERM).encode())
        os._exit(127)


def posix_spawn_group(executable: str, argv: Sequence[str], environment,
                      fd_map: Mapping[int, int], reset_signals: Sequence[int]) -> int:
    """posix_spawnp as a new process group's leader with fd_map (child fd -> parent fd,
    every parent fd above 2) dup2'ed; the pid, or OSError if it cannot start.

    reset_signals: those the agent ignores, reset to their default (Python ignores
    SIGPIPE; a task must not). The child gets the open-file limit the agent started
    with (agent.fdlimit).
    """
    return fdlimit.spawned_with_original_limit(max(fd_map.values(), default=2), partial(
        os.posix_spawnp, executable, argv, environment,
        file_actions=[(os.POSIX_SPAWN_DUP2, parent, child) for child, parent in fd_map.items()],
        setsigdef=reset_signals, setpgroup=0))


def spawn_in_group(reactor, protocol, argv: Sequence[str], env: Mapping[str, str] | None = None,
                   cwd: str | None = None, child_fds: Mapping[int, object] | None = None,
                   limits: Sequence[tuple[str, int]] = (), executable: str | None = None,
                   new_session: bool = False, ignore_signals: Sequence[int] = ()):
    """Start argv as a new process group connected to protocol; raise OSError if it cannot start.

    argv[0] without a slash is searched on PATH; with one it is relative to
    the task's working directory, unless executable names the file to run.
    limits are (name, value) pairs of RLIMITS. child_fds: the child's
    descriptors, each "r" (a pipe the agent reads), "w" (one it writes) or a
    descriptor of the agent's to hand over. new_session: in a session of its
    own as well (setsid), out of reach of the terminal's and the agent's group
    signals. ignore_signals: signals the program starts with ignored, before its
    first instruction (a program that ignores them itself would die of one that
    comes while it starts).
    """
    environment = environment_bytes() if env is None else dict(env)  # the agent's, as it is now
    child_fds = dict(child_fds or {0: "w", 1: "r", 2: "r"})
    rlimits = resolve_limits(limits)
    if cwd is None and not rlimits and not new_session and not ignore_signals \
            and _spawnable(child_fds):
        return spawn_child(reactor, protocol, executable or argv[0], list(argv), environment,
                           child_fds, posix_spawn_group, ignored_signals(signal.NSIG))
    return fdlimit.made_despite_a_hold(partial(
        GroupProcess, reactor, executable or argv[0], list(argv), environment, cwd, protocol,
        childFDs=child_fds, rlimits=rlimits, new_session=new_session,
        ignore_signals=ignore_signals))


def _spawnable(child_fds: Mapping[int, object]) -> bool:
    """posix_spawn's simple dup2 plan works: no stdin pipe to write, and no descriptor
    handed over that is one of the child's own 0-2 (a dup2 could clobber it first)."""
    return all(target == "r" or (isinstance(target, int) and target > 2)
               for target in child_fds.values())
