"""Start a child as the leader of its own process group.

Twisted's Process already uses posix_spawnp when it can, but it neither puts
the child in a new process group nor keeps the per-spawn cost flat: it
inspects every open descriptor of the agent (thousands under load) on each
spawn. GroupProcess asks posix_spawnp for a new group and only maps the
child's own descriptors (Python opens everything else close-on-exec).

posix_spawn cannot change directory, so a task with its own cwd takes the
fork path; there an error pipe reports a failed exec as an OSError in the
parent, exactly like posix_spawnp does, so "could not start" is never
confused with a program that exited 1.
"""
from __future__ import annotations

import errno
import fcntl
import os
import signal
from typing import Mapping, Sequence

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None

from twisted.internet import process
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST

from agent._twisted_compat import environment_bytes, ignored_signals
from agent.runner import fdlimit

READ_CHUNK = 1 << 20
"""Bytes taken from a pipe per read; Twisted's stock reader takes 8 KiB."""

PIPE_SIZE = 1 << 20
"""Kernel buffer asked for an output pipe its writer fills, so a fast writer blocks less."""

DEFAULT_PIPE_SIZE = 1 << 16
"""Linux's pipe capacity: a read this large means the writer had filled the pipe."""

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

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
    pipe to PIPE_SIZE once the child has filled it.

    Growing every pipe at once would charge each task 2 MiB of pipe buffers
    to the agent's user, whatever it writes: 1000 quiet tasks would hold
    2 GiB against fs.pipe-user-pages-soft (64 MiB), past which Linux gives
    an unprivileged user's new pipes two pages. It also cost two fcntl calls
    per task that most tasks never needed.
    """

    _grown = False

    def doRead(self):
        try:
            data = os.read(self.fd, READ_CHUNK)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EINTR):
                return None
            return CONNECTION_LOST
        if not data:
            return CONNECTION_DONE
        if len(data) >= DEFAULT_PIPE_SIZE and not self._grown:
            self._grow()
        self.dataReceived(data)
        return None

    def _grow(self) -> None:
        self._grown = True
        try:
            fcntl.fcntl(self.fd, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # over fs.pipe-max-size or the user's pipe quota, or not Linux: keep it


class GroupProcess(process.Process):
    """A Process whose child leads a new process group (pgid == pid), or a new
    session (and so a new group too) with new_session."""

    processReaderFactory = LargeChunkReader

    def __init__(self, *args, rlimits: Sequence[tuple[int, tuple[int, int]]] = (),
                 new_session: bool = False, ignore_signals: Sequence[int] = (), **kwargs):
        # setrlimit calls for the child, and signals it starts with ignored;
        # posix_spawn cannot make them, so they force the fork path. Set before
        # Process.__init__, which spawns.
        self.rlimits = list(rlimits)
        self.new_session = new_session
        self.ignore_signals = list(ignore_signals)
        super().__init__(*args, **kwargs)

    def _trySpawnInsteadOfFork(self, path, uid, gid, executable, args, environment, kwargs):
        if uid is not None or gid is not None or path is not None or self.rlimits \
                or self.ignore_signals:
            return False
        fdmap = kwargs["fdmap"]
        if any(parent_fd < 3 for parent_fd in fdmap.values()):
            return False  # the simple dup2 plan below would clobber a source fd
        # not both: glibc makes the session first, and a session leader may not setpgid
        leads = {"setsid": True} if self.new_session else {"setpgroup": 0}
        with fdlimit.original_limit_held(max(fdmap.values(), default=2)) as inherited:
            self.pid = os.posix_spawnp(
                executable,
                args,
                environment,
                file_actions=[(os.POSIX_SPAWN_DUP2, parent, child) for child, parent in fdmap.items()],
                setsigdef=ignored_signals(signal.NSIG),  # Python ignores SIGPIPE; a task must not
                **leads,
            )
        self.status = -1
        if not inherited:
            _give_back_open_file_limit(self.pid)
        return True

    def _fork(self, path, uid, gid, executable, args, environment, **kwargs):
        if self._trySpawnInsteadOfFork(path, uid, gid, executable, args, environment, kwargs):
            return
        report_r, report_w = os.pipe()
        self._exec_report_fd = report_w
        fdmap = {**kwargs.pop("fdmap"), report_w: report_w}
        try:
            super()._fork(path, uid, gid, executable, args, environment, fdmap=fdmap, **kwargs)
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


def _give_back_open_file_limit(pid: int) -> None:
    """Set the child's open-file limit from outside, at once, when the agent holds
    too many descriptors to lower its own around the spawn: the program has only
    just started, but it may have read its limit (or forked) already."""
    original = fdlimit.children_limit()
    if original is not None:
        try:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, original)
        except OSError:
            pass  # already gone: nothing left to limit


def spawn_in_group(reactor, protocol, argv: Sequence[str], env: Mapping[str, str] | None = None,
                   cwd: str | None = None, child_fds: Mapping[int, object] | None = None,
                   limits: Sequence[tuple[str, int]] = (), executable: str | None = None,
                   new_session: bool = False, ignore_signals: Sequence[int] = ()):
    """Start argv as a new process group connected to protocol; raise OSError if it cannot start.

    argv[0] without a slash is searched on PATH; with one it is relative to
    the task's working directory, unless executable names the file to run.
    limits are (name, value) pairs of RLIMITS. new_session: in a session of
    its own as well (setsid), out of reach of the terminal's and the agent's
    group signals. ignore_signals: signals the program starts with ignored,
    before its first instruction (a program that ignores them itself would
    die of one that comes while it starts).
    """
    environment = environment_bytes() if env is None else dict(env)  # the agent's, as it is now
    return GroupProcess(reactor, executable or argv[0], list(argv), environment, cwd, protocol,
                        childFDs=dict(child_fds or {0: "w", 1: "r", 2: "r"}),
                        rlimits=resolve_limits(limits), new_session=new_session,
                        ignore_signals=ignore_signals)
