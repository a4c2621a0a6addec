"""The task engine both doors share: limits, queue, registry, cancel, shutdown.

Doors translate their wire format into `Engine.submit` calls and an
Outcome back into their wire format; every rule about when a task may run
lives here.
"""
from __future__ import annotations

import uuid
from typing import Callable

from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, succeed
from twisted.logger import Logger

from agent.doors.tcp.wire import TaskRequest
from agent.core.outcome import Ending, Outcome
from agent.runner.process import OutputSink, TaskProcess, start_task

log = Logger()


class Busy(Exception):
    """The lane's limit is reached and it rejects rather than queues."""


class ShuttingDown(Exception):
    """The agent is stopping: it answers for tasks it knows but starts no new one."""


class AlreadyKnown(Exception):
    """The request's id (its idempotency key) names a task the agent already has:
    it is not run again. `task` is the live task, or None if it has ended
    (then `task_id` names it in the history)."""

    def __init__(self, key: str, task_id: str, task: "Task | None" = None):
        super().__init__(key)
        self.key = key
        self.task_id = task_id
        self.task = task


class Lane:
    """A concurrency limit shared by every task submitted through it.

    limit 0 means unlimited. Over the limit a queueing lane waits FIFO for a
    free slot, a rejecting lane raises Busy at once; a queueing lane with
    max_waiting tasks already waiting raises Busy too (0 = no bound), so a
    flood cannot pile up in the agent's memory.
    """

    def __init__(self, limit: int, queue: bool = False, max_waiting: int = 0):
        self.limit = limit
        self.queue = queue
        self.max_waiting = max_waiting
        self._slots = DeferredSemaphore(limit) if limit > 0 else None

    @property
    def running(self) -> int:
        return 0 if self._slots is None else self._slots.limit - self._slots.tokens

    def acquire(self) -> Deferred:
        if self._slots is None:
            return succeed(None)
        if self._slots.tokens == 0 and (not self.queue or 0 < self.max_waiting <= self.waiting):
            raise Busy()
        return self._slots.acquire()

    @property
    def waiting(self) -> int:
        return 0 if self._slots is None else len(self._slots.waiting)

    def release(self) -> None:
        if self._slots is not None:
            self._slots.release()


class Task:
    """One submitted task: its request, its state, and its Outcome once it ends."""

    def __init__(self, request: TaskRequest, source: str, sink: OutputSink, task_id: str,
                 held: bool = False):
        self.id = task_id
        self.request = request
        self.source = source
        self.sink = sink
        self.state = "queued"
        self.runner: TaskProcess | None = None
        self.outcome: Outcome | None = None
        self.cleanup: str | None = None
        """'complete' once its process group is verified empty, 'incomplete' if
        something in it survived repeated SIGKILL, None until known."""
        self.holders: int | None = 1 if held else None
        """Clients whose going away ends the task (a TCP connection, a POST /run);
        None for a task that lives on its own (POST /tasks)."""
        self._waiters: list[Deferred] = []
        self._cleanup_waiters: list[Deferred] = []
        self._waiting_for_slot: Deferred | None = None

    def ended(self) -> Deferred[Outcome]:
        """A Deferred of the Outcome, new for each caller: what one waiter's
        callbacks return can never reach another's."""
        if self.outcome is not None:
            return succeed(self.outcome)
        waiter: Deferred[Outcome] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def cleaned(self) -> Deferred["Task"]:
        """A Deferred of the task once its cleanup is known (task.cleanup set): after
        the end, when its process group is verified empty (or given up on, within 5 s)."""
        if self.cleanup is not None:
            return succeed(self)
        waiter: Deferred[Task] = Deferred()
        self._cleanup_waiters.append(waiter)
        return waiter

    def hold(self) -> None:
        """One more client (a retry of the same id) now waits for this task."""
        if self.holders is not None:
            self.holders += 1

    def _let_go(self) -> bool:
        """One holder left; True when none is left and the task should end."""
        if self.holders is None or self.outcome is not None:
            return False
        self.holders -= 1
        return self.holders <= 0

    def cancel(self, message: str = "cancelled", grace: float = 0.0) -> None:
        """Drop the task if it waits for a slot; otherwise end its process group."""
        if self._waiting_for_slot is not None:
            self._waiting_for_slot.cancel()
        elif self.runner is not None:
            self.runner.cancel(message, grace)


class Engine:
    """Runs TaskRequests under per-lane limits and keeps the registry of live tasks."""

    def __init__(self, reactor, start=start_task):
        self._reactor = reactor
        self._start_task = start
        self.live: dict[str, Task] = {}
        self.live_by_key: dict[str, Task] = {}
        self.history_lookup: Callable[[str], str | None] = lambda key: None
        """The id of an ended task submitted with this key, if the history knows one."""
        self.observers: list[Callable[[Task], None]] = []
        """Called on each state change of a task: queued, running, finished (once each)."""
        self.cleanup_observers: list[Callable[[Task], None]] = []
        """Called once a finished task's cleanup is known (task.cleanup set): a separate
        kind of news, so an observer can never take it for a second end."""
        self.accepting = True
        """False once the agent is stopping: submit raises ShuttingDown."""
        self.log_tasks = "all"
        """Which ended tasks get a log line: all, failures (not exit code 0) or none."""
        self.output_taps: list[Callable[[Task], OutputSink]] = []
        """Each gives a second sink for a task's output (the store's spool),
        asked when the task starts; the door's own sink still gets every chunk."""

    def submit(self, request: TaskRequest, lane: Lane, sink: OutputSink, source: str = "tcp",
               held: bool = False, **run_options) -> Task:
        """Queue or start a task; raise Busy when the lane is full and rejects,
        AlreadyKnown when its id names a task submitted before (never run twice).

        held: the task ends when its holders let go (see release_many).
        run_options (env, cwd, output_limit, ...) go to the runner unchanged.
        """
        key = request.id or None
        if key is not None:
            self._refuse_known(key)
        if not self.accepting:
            raise ShuttingDown()
        slot = lane.acquire()
        task = Task(request, source, sink, uuid.uuid4().hex, held)
        self.live[task.id] = task
        if key is not None:
            self.live_by_key[key] = task
        self._notify(task)
        if not slot.called:
            task._waiting_for_slot = slot
        slot.addCallbacks(self._start, self._dropped, callbackArgs=(task, lane, run_options),
                          errbackArgs=(task,))
        return task

    def _refuse_known(self, key: str) -> None:
        live = self.live_by_key.get(key)
        if live is not None:
            raise AlreadyKnown(key, live.id, live)
        ended = self.history_lookup(key)
        if ended is not None:
            raise AlreadyKnown(key, ended)

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
        if not task.runner.finished:
            self._notify(task)
        task.runner.ended.addCallback(self._finished, task, lane)
        task.runner.cleaned.addCallback(self._cleaned, task)

    def _sink_for(self, task: Task) -> OutputSink:
        taps = [tap(task) for tap in self.output_taps]
        return _Tee((task.sink, *taps)) if taps else task.sink

    def _dropped(self, failure, task: Task) -> None:
        failure.trap(CancelledError)
        task._waiting_for_slot = None
        self._settle(task, Outcome(Ending.CANCELLED, -1, "cancelled before it started"))
        self._cleaned(True, task)  # nothing ran, so nothing is left

    def _finished(self, outcome: Outcome, task: Task, lane: Lane) -> None:
        """Answer first, log second: the log line costs ~50 us that no client should wait for."""
        self._settle(task, outcome, lane)
        if self.log_tasks == "none" or (self.log_tasks == "failures" and outcome.succeeded):
            return
        log.info("task {id} {argv0} {ending} exit_code={exit_code} duration_ms={duration_ms}",
                 id=task.request.id or task.id, argv0=task.request.command[0],
                 ending=outcome.ending.value, exit_code=outcome.exit_code,
                 duration_ms=None if outcome.duration_ms is None else round(outcome.duration_ms, 1))

    def _cleaned(self, emptied: bool, task: Task) -> None:
        task.cleanup = "complete" if emptied else "incomplete"
        if not emptied:
            log.error("task {id}: process group {pgid} still has members after repeated SIGKILL",
                      id=task.request.id or task.id, pgid=task.runner.pid)
        for observer in self.cleanup_observers:
            observer(task)
        waiters, task._cleanup_waiters = task._cleanup_waiters, []
        for waiter in waiters:
            waiter.callback(task)

    def _settle(self, task: Task, outcome: Outcome, lane: Lane | None = None) -> None:
        """Record the end, then free the slot, then answer: observers see A end before B starts."""
        del self.live[task.id]
        if task.request.id:
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
        for observer in self.observers:
            observer(task)


class _Tee:
    """Hands every chunk to several sinks, in order."""

    def __init__(self, sinks: tuple[OutputSink, ...]):
        self._sinks = sinks

    def received(self, fd: int, data: bytes) -> None:
        for sink in self._sinks:
            sink.received(fd, data)
