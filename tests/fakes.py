"""In-memory stand-ins for processes, so timers are driven by a Clock, not sleeps."""
from __future__ import annotations

from types import SimpleNamespace

from twisted.internet import error, task
from twisted.internet.defer import succeed
from twisted.python.failure import Failure

from agent.core.engine import Engine
from agent.runner.process import start_task


class StdoutCollector:
    """An output sink for tests: keeps stdout as chunks, stderr only counted (the TCP
    door's own is agent.doors.tcp.collector.ResultOutput)."""

    def __init__(self):
        self.chunks: list[bytes] = []
        self.sizes = {1: 0, 2: 0}

    def received(self, fd: int, data: bytes) -> None:
        self.sizes[fd] = self.sizes.get(fd, 0) + len(data)
        if fd == 1:
            self.chunks.append(data)

    def text(self) -> str:
        """stdout decoded as UTF-8, invalid bytes replaced, so JSON stays valid."""
        return b"".join(self.chunks).decode("utf-8", "replace")


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
        self.executables: list[str | None] = []
        """The executable each spawn was given (None: argv[0])."""
        self.fail_with: Exception | None = None

    def __call__(self, reactor, protocol, argv, env=None, cwd=None, child_fds=None, limits=(),
                 executable=None):
        if self.fail_with is not None:
            raise self.fail_with
        transport = FakeProcessTransport(self.next_pid)
        self.next_pid += 1
        self.spawned.append((list(argv), protocol))
        self.executables.append(executable)
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


class NoOutput:
    def received(self, fd: int, data: bytes) -> None:
        pass


class MemoryHistory:
    """The engine's History in memory: keys and records of the tasks it saw, no output kept.

    A record is a namespace with the fields the doors read; `writable` stands for the disk."""

    def __init__(self):
        self.records: dict[str, SimpleNamespace] = {}
        self.keys: dict[str, str] = {}
        self.writable = True
        self.cleanups: list[tuple[str, str]] = []

    def observe(self, task) -> None:
        if task.request.id is not None:
            self.keys[task.request.id] = task.id
        command = task.request.command
        self.records[task.id] = SimpleNamespace(id=task.id, command=command, state=task.state,
                                                outcome=task.outcome,
                                                is_command=lambda argv: tuple(argv) == command)

    def observe_cleanup(self, task) -> None:
        self.cleanups.append((task.id, task.cleanup))

    def tap(self, task):
        return NoOutput()

    def task_for_key(self, key: str):
        return self.keys.get(key)

    def get(self, task_id: str):
        return succeed(self.records.get(task_id))

    def forget(self, task_id: str) -> None:
        """As a purge would: the record goes, but (for a race) the key still names it."""
        self.records.pop(task_id, None)

    def health(self) -> dict:
        return {"writable": self.writable, "error": None if self.writable else "disk full"}


class FakeHost:
    """A Clock, a fake spawner, a kill recorder and an in-memory history, wired into an Engine."""

    def __init__(self, history=None, clock: task.Clock | None = None, **engine_options):
        """clock: one the history already keeps time by, so the engine and it agree."""
        self.clock = clock if clock is not None else task.Clock()
        self.spawn = FakeSpawner()
        self.kills = KillRecorder()
        self.history = history if history is not None else MemoryHistory()
        self.engine = Engine(self.clock, self.history, start=self.start, **engine_options)

    def start(self, reactor, argv, sink, **kwargs):
        return start_task(reactor, argv, sink, spawn=self.spawn, killpg=self.kills,
                          group_alive=self.kills.group_alive, **kwargs)
