"""In-memory stand-ins for processes, so timers are driven by a Clock, not sleeps."""
from __future__ import annotations

from twisted.internet import error, task
from twisted.python.failure import Failure

from agent.core.engine import Engine
from agent.runner.process import start_task


class FakeProcessTransport:
    def __init__(self, pid: int):
        self.pid = pid
        self.lost = False

    def loseConnection(self):
        self.lost = True


class FakeSpawner:
    """Records spawns; `fail_with` makes the next spawn raise like posix_spawnp does."""

    def __init__(self, first_pid: int = 1000):
        self.next_pid = first_pid
        self.spawned: list[tuple[list[str], object]] = []
        self.fail_with: Exception | None = None

    def __call__(self, reactor, protocol, argv, env=None, cwd=None, child_fds=None, limits=()):
        if self.fail_with is not None:
            raise self.fail_with
        transport = FakeProcessTransport(self.next_pid)
        self.next_pid += 1
        self.spawned.append((list(argv), protocol))
        protocol.makeConnection(transport)
        return transport

    def protocol(self, index: int = -1):
        return self.spawned[index][1]


class KillRecorder:
    """Stands in for os.killpg; groups listed in `survivors` never empty."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []
        self.survivors: set[int] = set()

    def __call__(self, pgid: int, sig: int) -> None:
        self.calls.append((pgid, sig))

    def group_alive(self, pgid: int) -> bool:
        return pgid in self.survivors


def exit_with(protocol, code: int = 0, signal: int | None = None) -> None:
    """Make a fake child exit and its pipes close, as Twisted would report it."""
    if code == 0 and signal is None:
        reason = Failure(error.ProcessDone(0))
    else:
        reason = Failure(error.ProcessTerminated(None if signal else code, signal))
    protocol.processExited(reason)
    protocol.processEnded(reason)


class FakeHost:
    """A Clock, a fake spawner and a kill recorder, wired into an Engine."""

    def __init__(self):
        self.clock = task.Clock()
        self.spawn = FakeSpawner()
        self.kills = KillRecorder()
        self.engine = Engine(self.clock, start=self.start)

    def start(self, reactor, argv, sink, **kwargs):
        return start_task(reactor, argv, sink, spawn=self.spawn, killpg=self.kills,
                          group_alive=self.kills.group_alive, **kwargs)
