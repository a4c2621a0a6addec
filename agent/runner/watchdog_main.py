"""The watchdog program: kills the agent's task groups when the agent cannot.

A kill -9 (or a crash) of the agent used to leave its running tasks'
process groups alive until the next start recovered them; in a fleet the
same task would then run on two nodes. This small process, started by the
agent (agent.runner.watchdog) with a pipe as its stdin, outlives the agent
by a moment: when its stdin ends without a "bye", the agent is gone, and it
SIGKILLs every group it was told to watch (killpg: grandchildren included)
and exits. It also enforces the node's lease: "fenced" groups (fleet tasks)
are SIGKILLed once the last lease the agent sent has run out, even while
the agent itself is stopped (SIGSTOP) or cut off, and it says so on stdout.

It ignores SIGTERM, SIGINT, SIGHUP and SIGPIPE (a service manager stopping
the agent must still let the agent give its tasks their grace) and holds
nothing but its three pipes (see let_go_of_everything_else). It imports
only the standard library, so it starts quickly and stays small.

    python -m agent.runner.watchdog_main
"""
from __future__ import annotations

import os
import select
import signal
import time
from typing import Callable

from agent.runner import watchdog_wire as wire

IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE)

MAX_WAIT = 1.0
"""Longest sleep while a lease is running out: the deadline is kept on
CLOCK_BOOTTIME, which counts a suspended machine's sleep, but poll's timeout
does not; so a suspend cannot stretch the lease by more than this."""

READ_SIZE = 1 << 16

REST = 0.05
"""Seconds the watchdog sleeps after each read, so the lines of many tasks
arrive in one read: a line per task start and end would otherwise wake it
twice per task (about 0.1 ms of CPU for each task the agent runs). The pipe
holds thousands of lines meanwhile, and the agent's end waits for room if it
fills; the agent's death is noticed this much later at most, and the lease
is never overslept (see Guard.wait_limit)."""


def _boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


clock: Callable[[], float] = _boottime if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic
"""The watchdog's clock: monotonic, and on Linux counting time suspended too,
since the lease it mirrors runs out in the database's time, not this machine's."""


def kill_group(pgid: int) -> bool:
    """SIGKILL the group; False if it no longer exists (nothing to do) or is not ours."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class Guard:
    """What the watchdog knows (the watched groups, the lease) and does to them,
    apart from pipes and clocks: each call is given the time."""

    def __init__(self, kill: Callable[[int], bool] = kill_group):
        self._kill = kill
        self.watched: set[int] = set()
        self.fenced: set[int] = set()
        """The watched groups that die when the lease runs out."""
        self.deadline: float | None = None
        """When the lease runs out (on the watchdog's clock); None: no lease."""

    def handle(self, message: wire.Message, now: float) -> tuple[int, ...]:
        """Apply one message from the agent; return the fenced groups it killed
        (a fenced group watched, or a lease given, when the lease is already out)."""
        match message:
            case wire.Watch(pgid, fenced):
                self.watched.add(pgid)
                if fenced:
                    self.fenced.add(pgid)
                else:
                    self.fenced.discard(pgid)
            case wire.Forget(pgid):
                self.watched.discard(pgid)
                self.fenced.discard(pgid)
            case wire.Lease(seconds):
                self.deadline = now + seconds
            case wire.NoLease():
                self.deadline = None
        return self.expire(now)

    def expire(self, now: float) -> tuple[int, ...]:
        """Once the lease has run out, SIGKILL and forget every fenced group; return
        those that still existed. The lease stays out until the agent sends a new one,
        so a fenced group watched meanwhile dies at once."""
        if not self.fenced or self.deadline is None or now < self.deadline:
            return ()
        fenced, self.fenced = sorted(self.fenced), set()
        self.watched.difference_update(fenced)
        return tuple(pgid for pgid in fenced if self._kill(pgid))

    def wait_limit(self, now: float, longest: float = MAX_WAIT) -> float | None:
        """How long the watchdog may sleep before it has something to do on its own:
        until the lease runs out, if a fenced group would die then (at most
        `longest`); None: for ever."""
        if self.deadline is None or not self.fenced:
            return None
        return min(max(self.deadline - now, 0.0), longest)

    def agent_gone(self) -> tuple[int, ...]:
        """The agent died without a bye: SIGKILL every watched group; return those that existed."""
        killed = tuple(pgid for pgid in sorted(self.watched) if self._kill(pgid))
        self.watched.clear()
        self.fenced.clear()
        return killed


def serve(guard: Guard, read: Callable[[], bytes], write: Callable[[bytes], None],
          wait: Callable[[float | None], bool], now: Callable[[], float],
          rest: Callable[[float], None]) -> str:
    """Read the agent's lines until it says bye or goes away; return which ("bye", "eof").

    read: the next bytes from the agent (b"" at the end). wait(timeout): True
    once there is something to read, False after timeout seconds (None: no limit).
    write: one line to the agent (it may be gone: errors are the caller's to swallow).
    rest(seconds): sleep after each read (see REST).
    """
    pending = b""
    while True:
        if wait(guard.wait_limit(now())):
            data = read()
            if not data:
                guard.agent_gone()
                return "eof"
            lines = (pending + data).split(b"\n")
            pending = lines.pop()
            for line in lines:
                if _received(guard, line, write, now) == "bye":
                    return "bye"
            if len(pending) > wire.MAX_LINE:
                too_long = f"a line longer than {wire.MAX_LINE} bytes, dropped"
                write(wire.encode(wire.Trouble(too_long)))
                pending = b""
            limit = guard.wait_limit(now(), REST)
            rest(REST if limit is None else limit)
        _report(guard.expire(now()), write)


def _received(guard: Guard, line: bytes, write, now) -> str | None:
    try:
        message = wire.parse(line)
    except wire.BadMessage as e:
        write(wire.encode(wire.Trouble(str(e))))
        return None
    if isinstance(message, wire.Bye):
        return "bye"
    _report(guard.handle(message, now()), write)
    return None


def _report(fenced: tuple[int, ...], write) -> None:
    if fenced:
        write(wire.encode(wire.Fenced(fenced)))


def _wait_for(fd: int) -> Callable[[float | None], bool]:
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)

    def wait(timeout: float | None) -> bool:
        return bool(poller.poll(None if timeout is None else timeout * 1000.0))
    return wait


def _write_to_agent(data: bytes) -> None:
    try:
        os.write(1, data)
    except OSError:
        pass  # the agent is gone or not reading: it would not log it anyway


def let_go_of_everything_else() -> None:
    """Hold no descriptor but the three pipes, and no directory: the agent's own
    launcher may have handed it descriptors without close-on-exec (a pipe a
    supervisor waits on), which the spawn passes on, and its working directory
    may be a mount someone will want to unmount."""
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    os.chdir("/")


def main() -> int:
    for number in IGNORED_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    let_go_of_everything_else()
    serve(Guard(), lambda: os.read(0, READ_SIZE), _write_to_agent, _wait_for(0), clock, time.sleep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
