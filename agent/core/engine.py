"""The task engine every door shares: admission, limits, the registry of live tasks,
cancel and shutdown.

A door turns its wire format into a TaskRequest, asks `Engine.admit`, and
translates the decision (agent.core.decisions) back; every rule about when a
task may run, and what a known id means, lives here.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Protocol

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.logger import Logger

from agent.core.allowlist import AllowList, NotAllowed
from agent.core.decisions import (Attached, Busy, Decision, HistoryDown, HistoryFull, KeyConflict,
                                  KeyForgotten, Refused, Replay, ShuttingDown, Started)
from agent.core.lanes import Lane
from agent.core.outcome import Ending, Outcome
from agent.core.request import TaskRequest, for_log
from agent.core.task import Task
from agent.logformat import PREFORMATTED
from agent.runner.process import OutputSink, start_task

log = Logger()

LOG_TASKS = ("all", "failures", "none")


class History(Protocol):
    """What the engine needs of the task history (agent.history.store.Store is one)."""

    def observe(self, task: Task) -> None:
        """Each state change of a task: queued, running, finished (once each)."""

    def observe_cleanup(self, task: Task) -> None:
        """A finished task's cleanup is known (task.cleanup set)."""

    def tap(self, task: Task) -> OutputSink:
        """Where a starting task's output is kept, beside the door's own sink."""

    def task_for_key(self, key: str) -> str | None:
        """The id of the task submitted with this idempotency key, if the history has one."""

    def get(self, task_id: str) -> Deferred:
        """The task's record (with .id, .is_command(argv) and .outcome), or None once removed."""

    def health(self) -> dict:
        """{"writable": bool, "error": str | None, ...}"""


class Engine:
    """Admits TaskRequests, runs them under per-lane limits, keeps the registry of live tasks."""

    def __init__(self, reactor, history: History, *, start=start_task, log_tasks: str = "all",
                 observers: Iterable[Callable[[Task], None]] = (),
                 cleanup_observers: Iterable[Callable[[Task], None]] = (),
                 refusal_observers: Iterable[Callable[[str, str], None]] = (),
                 allow: AllowList | None = None):
        """history: records every task and answers for ended ones (required: without it
        an id could not be an idempotency key). observers: told of each state change
        after the history. cleanup_observers: told once a task's cleanup is known
        (task.cleanup set), after the history. refusal_observers: told (door, reason)
        of each request refused, by admission or by a door (see refused).
        log_tasks: which ended tasks get a log line (LOG_TASKS).
        allow: the programs a request may run (None: any)."""
        if log_tasks not in LOG_TASKS:
            raise ValueError(f"log_tasks must be one of {LOG_TASKS}, not {log_tasks!r}")
        self._reactor = reactor
        self._history = history
        self._start_task = start
        self._log_tasks = log_tasks
        self._observers = (history.observe, *observers)
        self._cleanup_observers = (history.observe_cleanup, *cleanup_observers)
        self._refusal_observers = tuple(refusal_observers)
        self._allow = allow
        self.live: dict[str, Task] = {}
        self.live_by_key: dict[str, Task] = {}
        self.accepting = True
        """False once the agent is stopping: nothing new is started."""

    @property
    def history(self) -> History:
        """Where the doors read records and output from: the engine's own history."""
        return self._history

    # -- admission: one step, one decision, for every door

    def admit(self, request: TaskRequest, lane: Lane, sink: OutputSink, source: str, *,
              held: bool = False, durable: bool = False, launched_by: str | None = None,
              **run_options) -> Deferred[Decision]:
        """Start a task, or say why not, in one decision (agent.core.decisions).

        A request whose id names a known task never runs again: a live one with the
        same command is Attached (and held, if held), an ended one is a Replay of its
        record, another command is a KeyConflict. Otherwise the task is Started, or
        refused: NotAllowed (not on the allow-list, checked first), ShuttingDown, Busy
        (the lane is full), HistoryDown (durable: the client will look it up later, so
        it needs a record the history can write).

        held: the task ends when every holder has let go (see release_many).
        launched_by: who asked, as the door knows them; recorded and logged.
        run_options (env, cwd, output_limit, ...) go to the runner unchanged.
        """
        if self._allow is not None:  # first: a refused command learns nothing of other tasks
            try:
                run_options["executable"] = self._allow.executable(
                    request.command, run_options.get("cwd"), run_options.get("env"))
            except NotAllowed as refused:
                return self._refuse(source, refused)
        key = request.id
        if key is not None:
            live = self.live_by_key.get(key)
            if live is not None:
                return self._attach(live, request, held, source)
            ended = self._history.task_for_key(key)
            if ended is not None:
                return self._replay(ended, request, source)
        if durable:
            health = self._history.health()
            if not health["writable"]:
                return self._refuse(source, HistoryDown(health["error"]))
            if health.get("full"):
                return self._refuse(source, HistoryFull())
        try:
            task = self.submit(request, lane, sink, source, held, launched_by=launched_by,
                               **run_options)
        except (Busy, ShuttingDown) as refused:
            return self._refuse(source, refused)
        return succeed(Started(task))

    def refused(self, source: str, reason: str) -> None:
        """A request refused, told to the refusal observers: by admission (its Refused's
        reason), or by the door `source` before admission (a malformed request, no token),
        so every refusal is counted in one place whichever door saw it."""
        for observer in self._refusal_observers:
            observer(source, reason)

    def _refuse(self, source: str, refusal: Refused) -> Deferred[Decision]:
        self.refused(source, refusal.reason)
        return fail(refusal)

    def _attach(self, task: Task, request: TaskRequest, held: bool,
                source: str) -> Deferred[Decision]:
        if task.request.command != request.command:
            return self._refuse(source, KeyConflict(request.id))
        if held:
            task.hold()
        return succeed(Attached(task))

    def _replay(self, task_id: str, request: TaskRequest, source: str) -> Deferred[Decision]:
        def decide(record) -> Replay:
            if record is None:  # pruned or purged between the two looks
                refusal: Refused = KeyForgotten(request.id)
            elif not record.is_command(request.command):
                refusal = KeyConflict(request.id)
            else:
                return Replay(record)
            self.refused(source, refusal.reason)
            raise refusal
        return self._history.get(task_id).addCallback(decide)

    def submit(self, request: TaskRequest, lane: Lane, sink: OutputSink, source: str = "tcp",
               held: bool = False, launched_by: str | None = None, **run_options) -> Task:
        """Queue or start a task with no admission (no key lookup): Busy when the lane
        is full and rejects, ShuttingDown once the agent stops. Doors use admit."""
        if not self.accepting:
            raise ShuttingDown()
        slot = lane.acquire(request.command)
        task = Task(request, source, sink, new_task_id(), held, launched_by)
        self.live[task.id] = task
        if request.id is not None:
            self.live_by_key[request.id] = task
        self._notify(task)
        if not slot.called:
            task._waiting_for_slot = slot
        slot.addCallbacks(self._start, self._dropped, callbackArgs=(task, lane, run_options),
                          errbackArgs=(task,))
        return task

    def release_many(self, tasks, message: str) -> None:
        """Their clients went away: end each task no other client still holds."""
        self.cancel_many([task for task in tasks if task._let_go()], message)

    def cancel_all(self, message: str, grace: float = 0.0) -> None:
        """End every live task and start no new one: the agent is shutting down.
        (Connections stay open during the grace, and a task started then would outlive it.)"""
        self.accepting = False
        self.cancel_many(self.live.values(), message, grace)

    @staticmethod
    def cancel_many(tasks, message: str, grace: float = 0.0) -> None:
        """End several tasks at once (SIGTERM, then SIGKILL after grace): queued
        ones first, so a slot freed by an ended task cannot start one that is
        about to be dropped."""
        for task in sorted(tasks, key=lambda t: t.runner is not None):
            task.cancel(message, grace)

    def _start(self, _, task: Task, lane: Lane, run_options) -> None:
        task._waiting_for_slot = None
        task.state = "running"
        task.runner = self._start_task(self._reactor, task.request.command, self._sink_for(task),
                                       timeout=task.request.timeout, limits=task.request.limits,
                                       **run_options)
        # "running" once the child has its pid (a busy agent starts it on a thread:
        # agent.runner.spawner); not at all if it could not start
        task.runner.spawned.addCallback(self._spawned, task)
        task.runner.ended.addCallback(self._finished, task, lane)
        task.runner.cleaned.addCallback(self._cleaned, task)

    def _spawned(self, running: bool, task: Task) -> None:
        if running:
            self._notify(task)

    def _sink_for(self, task: Task) -> OutputSink:
        return _Tee((task.sink, self._history.tap(task)))

    def _dropped(self, failure, task: Task) -> None:
        failure.trap(CancelledError)
        task._waiting_for_slot = None
        self._settle(task, Outcome(Ending.CANCELLED, -1, "cancelled before it started"))
        self._cleaned(True, task)  # nothing ran, so nothing is left

    def _finished(self, outcome: Outcome, task: Task, lane: Lane) -> None:
        """Answer first, log second: the log line costs ~50 us that no client should wait for."""
        self._settle(task, outcome, lane)
        if self._log_tasks == "none" or (self._log_tasks == "failures" and outcome.succeeded):
            return
        ident, argv0 = task.request.id or task.id, for_log(task.request.command[0])
        ending, exit_code, launched_by = outcome.ending.value, outcome.exit_code, task.launched_by
        duration_ms = None if outcome.duration_ms is None else round(outcome.duration_ms, 1)
        log.info(PREFORMATTED, text=f"task {ident} {argv0} {ending} exit_code={exit_code} "
                                    f"duration_ms={duration_ms} by {launched_by}",
                 id=ident, argv0=argv0, ending=ending, exit_code=exit_code,
                 duration_ms=duration_ms, launched_by=launched_by)

    def _cleaned(self, emptied: bool, task: Task) -> None:
        task.cleanup = "complete" if emptied else "incomplete"
        if not emptied:
            log.error("task {id}: process group {pgid} still has members after repeated SIGKILL",
                      id=task.request.id or task.id, pgid=task.runner.pid)
        for observer in self._cleanup_observers:
            observer(task)
        waiters, task._cleanup_waiters = task._cleanup_waiters, []
        for waiter in waiters:
            waiter.callback(task)

    def _settle(self, task: Task, outcome: Outcome, lane: Lane | None = None) -> None:
        """Record the end, then free the slot, then answer: observers see A end before B starts."""
        del self.live[task.id]
        if task.request.id is not None:
            self.live_by_key.pop(task.request.id, None)
        task.outcome = outcome
        task.state = "finished"
        self._notify(task)
        if lane is not None:
            lane.release()
        waiters, task._waiters = task._waiters, []
        for waiter in waiters:
            waiter.callback(outcome)

    def _notify(self, task: Task) -> None:
        for observer in self._observers:
            observer(task)


def new_task_id() -> str:
    """32 random hex digits (128 bits from the kernel): uuid4().hex's form, a quarter of its
    cost, which builds a UUID object only to print it."""
    return os.urandom(16).hex()


class _Tee:
    """Hands every chunk to several sinks, in order."""

    def __init__(self, sinks: tuple[OutputSink, ...]):
        self._sinks = sinks

    def received(self, fd: int, data: bytes) -> None:
        for sink in self._sinks:
            sink.received(fd, data)
