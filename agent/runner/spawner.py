"""A thread that waits for the kernel to start children, so the reactor does not.

posix_spawn returns once the child has exec'd: 0.15-0.3 ms a task in which
the calling thread waits. Under load the agent has other tasks' output,
exits and requests to handle meanwhile, and a second core to do it on: the
spawn thread makes the call (through ctypes, with the interpreter lock
released: agent.runner.cspawn) while the reactor goes on, and hands each pid
back to the reactor. A lone task is still spawned inline (agent.runner.child
decides): the hand-over would add two thread wake-ups to the one thing its
client waits for.

At most WINDOW starts are with the thread at once; the others wait here,
holding no descriptor (their pipes are made as the thread takes them), so
10,000 requests arriving at once cannot open 40,000 descriptors before the
first child runs, and a waiting start can still be dropped for nothing.

Until the reactor has taken a child's pid, that child exists but the runner
does not know it: `unknown` names such children, and `spawning` is true while
one may be being made, so nothing that reaps strangers (escaped processes,
leftovers of a group) reaps one of them in that moment and steals its exit status.
"""
from __future__ import annotations

import queue
import signal
import threading
from collections import deque
from functools import partial
from typing import Protocol

from agent import fdlimit
from agent.runner import cspawn

BUSY = 4
"""Tasks running at once from which a spawn goes to the thread: below it the agent
answers one client at a time (a serial scheduler), whose round trip the thread
would lengthen."""

WINDOW = 16
"""Starts handed to the thread at once: enough that it never waits for the reactor."""


class Start(Protocol):
    """One child to start (agent.runner.child._ThreadStart)."""

    dropped: bool

    def prepare(self) -> cspawn.Prepared:
        """Its pipes and C arguments, made as the thread takes it; raises if it cannot."""

    def spawned(self, pid: int | None, error: BaseException | None) -> None:
        """The answer, on the reactor: a pid, or why not."""


class Spawner:
    """One spawn thread, started on first use; results come back through the reactor."""

    def __init__(self, reactor, run=None, window: int = WINDOW):
        self._reactor = reactor
        self._run = run or run_holding_limit
        self._window = window
        self._waiting: deque[Start] = deque()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._results: list[tuple[Start, int | None, BaseException | None]] = []
        self._lock = threading.Lock()
        self._with_thread = 0
        self.spawning = False
        """A child may exist that is in neither `unknown` nor the runner's books yet."""
        self.unknown: set[int] = set()
        """Children started whose pid the reactor has not yet taken."""

    @property
    def queued(self) -> int:
        """Starts submitted whose answer the reactor has not yet had."""
        return len(self._waiting) + self._with_thread

    def submit(self, start: Start) -> None:
        """Start it on the thread; start.spawned(...) is called later, on the reactor."""
        self._waiting.append(start)
        self._feed()

    def _feed(self) -> None:
        while self._waiting and self._with_thread < self._window:
            start = self._waiting.popleft()
            if start.dropped:
                continue
            try:
                prepared = start.prepare()
            except Exception as e:  # out of descriptors, or arguments exec cannot take
                start.spawned(None, e)
                continue
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="agent-spawn",
                                                daemon=True)
                self._thread.start()
            self._with_thread += 1
            self._jobs.put((prepared, start))

    # -- on the spawn thread

    def _serve(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())  # the main thread's
        while True:
            jobs = [self._jobs.get()]
            while True:  # whatever else waits: one hand-back for the lot
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            for prepared, start in jobs:
                self._spawn(prepared, start)
            self._hand_back()

    def _spawn(self, prepared: cspawn.Prepared, start: Start) -> None:
        self.spawning = True
        try:
            pid = self._run(prepared)
        except BaseException as e:  # OSError: exec failed; anything else is reported too
            result = (start, None, e)
        else:
            self.unknown.add(pid)
            result = (start, pid, None)
        finally:
            self.spawning = False
        with self._lock:
            self._results.append(result)

    def _hand_back(self) -> None:
        with self._lock:
            results, self._results = self._results, []
        if results:
            self._reactor.callFromThread(self._deliver, results)

    # -- on the reactor

    def _deliver(self, results) -> None:
        for start, pid, error in results:
            self._with_thread -= 1
            if pid is not None:
                self.unknown.discard(pid)
            start.spawned(pid, error)
        self._feed()


def run_holding_limit(prepared: cspawn.Prepared) -> int:
    """cspawn.run, the child given the open-file limit the agent started with."""
    return fdlimit.spawned_with_original_limit(prepared.highest_fd,
                                               partial(cspawn.run, prepared))


_spawners: dict[int, Spawner] = {}


def spawner_for(reactor) -> Spawner:
    """The reactor's spawn thread (one per reactor; made on first use)."""
    spawner = _spawners.get(id(reactor))
    if spawner is None:
        spawner = _spawners[id(reactor)] = Spawner(reactor)
    return spawner


def existing_spawner(reactor) -> Spawner | None:
    """The reactor's spawn thread if it has one already."""
    return _spawners.get(id(reactor))


def may_reap_strangers() -> bool:
    """No spawn thread is between starting a child and recording its pid."""
    return not any(spawner.spawning for spawner in _spawners.values())


def is_unknown_child(pid: int) -> bool:
    return any(pid in spawner.unknown for spawner in _spawners.values())
