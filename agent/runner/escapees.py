"""Processes that leave their task's process group do not outlive the task either.

The agent kills a task's process group, and a program that calls setsid (a
double-forking daemon, `setsid cmd &`) leaves it. Such a process used to
outlive its task, re-parented to init where the agent could not see it. The
agent is now a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so an
orphaned descendant of a task is re-parented to the agent instead, and once
a second the agent looks at its children that are not a task it started:

- a zombie is reaped (Twisted reaps only the processes it started);
- a live one is killed, with its descendants, once every task that was live
  when the agent first saw it has ended: one of those started it, and what
  a task leaves behind never outlives it. Killing it earlier could break a
  task that still uses the daemon it started.
- when the agent stops, every one of them is killed.

Linux only (prctl and /proc); elsewhere this does nothing.
"""
from __future__ import annotations

import ctypes
import os
import signal
from typing import Callable, Collection

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from agent.runner import procinfo
from agent.runner.child import is_task_child
from agent.runner.spawner import may_reap_strangers

log = Logger()

PR_SET_CHILD_SUBREAPER = 36

INTERVAL = 1.0
"""Seconds between looks at the agent's children."""


def set_child_subreaper(on: bool) -> bool:
    """Make orphaned descendants re-parent to this process (or stop); False if impossible."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    return prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


def children_of(pid: int) -> list[int]:
    """pid's children, from /proc/PID/task/*/children (one file per thread)."""
    found: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(child) for child in f.read().split())
        except (OSError, ValueError):
            continue  # the thread ended, or a kernel without the file
    return found


def descendants_of(pid: int) -> list[int]:
    """Every process below pid, children before their own children."""
    found, frontier = [], [pid]
    while frontier:
        below = [child for parent in frontier for child in children_of(parent)]
        found += below
        frontier = below
    return found


def is_task_process(pid: int) -> bool:
    """A process the agent started as a task, which the runner (or Twisted) reaps."""
    return is_task_child(pid)


def _reap(pid: int) -> None:
    """Reap a zombie that is no task; not while the spawn thread may have started a
    child the runner does not know yet (agent.runner.spawner): the next look will.

    Asked again here, and in this order: the sweep decided pid was no task before
    reading /proc (which lets the spawn thread run), and a child that thread has
    just started is among the unknown ones before it stops `spawning`."""
    if not may_reap_strangers() or is_task_process(pid):
        return
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _kill(pid: int) -> bool:
    """SIGKILL pid; False if it may still live (not ours to kill: a setuid program)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return True


class EscapeeReaper:
    """Reaps and kills the agent's children that are not its tasks (see the module)."""

    def __init__(self, reactor, live_task_ids: Callable[[], Collection[str]],
                 own_pid: int | None = None, children=children_of, stat=procinfo.proc_stat,
                 descendants=descendants_of, kill=_kill, reap=_reap,
                 is_task=is_task_process, subreaper=set_child_subreaper):
        self._reactor = reactor
        self._live_task_ids = live_task_ids
        self._own_pid = own_pid
        self._children, self._stat, self._descendants = children, stat, descendants
        self._kill, self._reap, self._is_task = kill, reap, is_task
        self._subreaper = subreaper
        self._first_seen: dict[int, tuple[int, frozenset[str]]] = {}
        """Escaped pid -> (its start time, the tasks live when the agent first saw it)."""
        self._killed: set[tuple[int, int]] = set()
        """(pid, start time) of escapees already killed and logged: one that takes
        a while to die (or may not be killed) is signalled again, not logged again."""
        self._loop: LoopingCall | None = None
        self.killed = 0
        """Escapees killed since the agent started (each counted once, with what is below it)."""

    def start(self) -> None:
        own = os.getpid() if self._own_pid is None else self._own_pid
        if self._children is children_of and not os.path.exists(f"/proc/{own}/task/{own}/children"):
            # a kernel without CONFIG_PROC_CHILDREN: adopted orphans could never be found
            # and reaped, and their zombies would pile up in the agent; init reaps them better
            log.warn("cannot list the agent's children (/proc/PID/task/TID/children): a process "
                     "that leaves its task's process group (setsid) may outlive its task")
            return
        if not self._subreaper(True):
            log.warn("cannot become a child subreaper: a process that leaves its task's "
                     "process group (setsid) may outlive its task")
            return
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = self._reactor
        self._loop.start(INTERVAL, now=False)

    def stop(self) -> None:
        """Once the tasks' groups have been ended: nothing they left may stay."""
        if self._loop is not None:
            self._loop.stop()
            self._loop = None
            self.sweep(stopping=True)
            self._subreaper(False)

    def sweep(self, stopping: bool = False) -> None:
        try:
            self._sweep(stopping)
        except Exception:  # never let one bad look end the looking
            log.failure("looking for processes that left their task's process group")

    def _sweep(self, stopping: bool) -> None:
        own = os.getpid() if self._own_pid is None else self._own_pid
        present = set()
        for pid in self._children(own):
            if self._is_task(pid):
                continue
            stat = self._stat(pid)
            if stat is None:
                continue
            if stat.zombie:
                self._reap(pid)
                continue
            present.add(pid)
            seen = self._first_seen.get(pid)
            if seen is None or seen[0] != stat.start_time:  # new, or the pid was reused
                seen = self._first_seen[pid] = (stat.start_time,
                                                frozenset(self._live_task_ids()))
                if not stopping:
                    continue
            if stopping or seen[1].isdisjoint(self._live_task_ids()):
                self._kill_tree(stat, stopping)
        for gone in self._first_seen.keys() - present:
            del self._first_seen[gone]
        self._killed = {key for key in self._killed if key[0] in present}

    def _kill_tree(self, stat: procinfo.ProcStat, stopping: bool) -> None:
        below = self._descendants(stat.pid)
        refused = [pid for pid in (stat.pid, *below) if not self._kill(pid)]
        if (stat.pid, stat.start_time) in self._killed:
            return
        self._killed.add((stat.pid, stat.start_time))
        self.killed += 1
        log.warn("process {pid} left its task's process group{when}: killed it{more}{refused}",
                 pid=stat.pid,
                 when=" (the agent is stopping)" if stopping else " and outlived its task",
                 more=f" and {len(below)} process(es) below it" if below else "",
                 refused=f"; not allowed to kill {refused}" if refused else "")
