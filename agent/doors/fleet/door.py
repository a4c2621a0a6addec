"""The fleet door: claims queued tasks when this node has a free slot, feeds them through
the engine's one admission step, and reports each result through the fence.

A claim's local id is `fleet:ATTEMPT:KEY`, the node's idempotency key for that attempt: an
agent that finished an attempt and died before reporting it answers from its history after
a restart (see _resume), and a later attempt this node claims again is answered from the
earlier attempt's record instead of running twice (see _earlier_result).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from twisted.application.service import Service
from twisted.internet.defer import (CancelledError, Deferred, DeferredList, inlineCallbacks,
                                    succeed)
from twisted.internet.error import TimeoutError
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from agent.core.decisions import Busy, Refused, Replay, ShuttingDown
from agent.core.engine import Engine
from agent.core.lanes import Lane
from agent.core.outcome import LOST, Ending, Outcome
from agent.core.request import InvalidRequest, TaskRequest, argv_item, for_log
from agent.core.task import Task
from agent.doors.fleet.lease import GenerationFile, NodeConfig, NodeLease
from agent.doors.fleet.results import TailSink, refusal_report, report_of
from agent.fleet import nodes, schema, tasks
from agent.fleet.database import Database, Listener, Unavailable
from agent.fleet.nodes import NodeIdInUse
from agent.fleet.records import Claim, Report

log = Logger()

SOURCE = "fleet"
UNLIMITED_BATCH = 64
"""With --parallel 0 (no limit) a node still runs at most this many fleet tasks at once."""
MAX_BACKOFF = 5.0
PRUNE_EVERY = 3600.0


def local_id(key: str, attempt: int) -> str:
    return f"fleet:{attempt}:{key}"


@dataclass(eq=False)
class Run:
    """One attempt this node claimed and admitted."""

    claim: Claim
    generation: int
    task: Task | None = None
    sink: TailSink | None = None
    cancel_asked: bool = False
    fenced: bool = False
    done: Deferred = field(default_factory=Deferred)
    """Fires once its result is recorded or it is handed back."""


class FleetDoor(Service):
    """This node as a worker of the fleet (a child service of the agent)."""

    name = "fleet"

    def __init__(self, engine: Engine, lane: Lane, reactor, *, work: Database, beat: Database,
                 config: NodeConfig, generation_file: GenerationFile,
                 listener: Callable[..., Listener], where: str = "", watchdog=None,
                 kill_grace: float = 5.0, poll: float = 2.0, drain_timeout: float = 30.0,
                 keep_days: float = 0.0):
        """work: the connection for claims, reports and reads; beat: the heartbeat's own
        connection, so a slow claim never delays the lease. listener(received,
        reconnected): a Listener for the fleet's channels. where: the database, for logs.
        drain_timeout: at a stop, how long to wait for results to reach the database.
        keep_days: ended fleet tasks and gone nodes older than this are pruned (0: never)."""
        self._engine = engine
        self._lane = lane
        self._reactor = reactor
        self._work = work
        self.config = config
        self._generation_file = generation_file
        self._where = where
        self._kill_grace = kill_grace
        self._listener = listener(self._notified, self._claim_soon)
        self.lease = NodeLease(reactor, beat, config, on_fence=self._fence, on_lost=self._lost,
                               on_cancel_requested=self._cancel_keys,
                               on_running=self._release_orphans, watchdog=watchdog)
        self.lease.running_count = lambda: len(self._runs)
        self._beat = beat
        self._poll = LoopingCall(self._claim_soon)
        self._poll.clock = reactor
        self._poll_every = poll
        self._drain_timeout = drain_timeout
        self._keep_days = keep_days
        self._prune = LoopingCall(self._prune_old)
        self._prune.clock = reactor
        self._runs: dict[str, Run] = {}
        self._sending: set[Deferred] = set()
        self._claiming = False
        self._joining: Deferred | None = None
        self._draining = False
        self._closed = False
        self.joined = Deferred()
        """Fires once the node has registered (for tests and start-up logs)."""
        self.claimed = 0
        """Tasks this node claimed since it started (agent_fleet_claims_total)."""
        self.reported: dict[str, int] = {}
        """Results sent, by the database's answer: recorded, already, stale."""

    # -- start: schema, resume what a previous run left, register, listen, claim

    def startService(self) -> None:
        super().startService()
        self._joining = self._join(mine=self._generation_file.read(), first=True)
        self._joining.addErrback(lambda f: f.trap(CancelledError))

    @inlineCallbacks
    def _join(self, mine: int | None, first: bool):
        delay, said_in_use = 0.5, False
        while not self._draining:
            try:
                if first:
                    yield self._work.run(schema.migrate)
                    yield self._resume(mine)
                registration = yield self.lease.register(mine)
                break
            except Unavailable:
                pass  # the Database logged it
            except NodeIdInUse as in_use:
                if not said_in_use:
                    log.error("fleet: {error}; trying again until its lease runs out",
                              error=str(in_use))
                    said_in_use = True
                delay = self.config.lease
            except schema.SchemaTooNew as too_new:
                log.critical("fleet: {error}; this node does not join the fleet", error=str(too_new))
                return
            yield self._sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)
        else:
            return
        self._generation_file.write(registration.generation)
        log.info("fleet node {node} joined the fleet at {where} (generation {generation}, "
                 "labels {labels}, parallel {parallel})", node=self.config.node_id,
                 where=self._where, generation=registration.generation,
                 labels=self.config.labels or "none", parallel=self.config.parallel or "unlimited")
        if first:
            self.lease.start()
            self._listener.start()
            self._poll.start(self._poll_every, now=False)
            if self._keep_days > 0:
                self._prune.start(PRUNE_EVERY, now=True)
            self.joined.callback(registration.generation)
        self._claim_soon()

    def _sleep(self, seconds: float) -> Deferred:
        return deferLater(self._reactor, seconds, lambda: None)

    @inlineCallbacks
    def _resume(self, mine: int | None):
        """The previous run of this agent (generation `mine`) may have died with attempts
        the database still has running here: report those its history saw finish, give
        the rest back to the queue (the watchdog ended their processes)."""
        if mine is None:
            return
        for key, attempt, generation, _ in (yield self._work.run(tasks.running_on,
                                                                 self.config.node_id)):
            if generation != mine:
                continue  # an older run's: the reaper queues it again
            record = yield self._local_record(local_id(key, attempt))
            if record is not None and record.ended and record.why_it_ended[0] != LOST:
                answer = yield self._work.run(tasks.report, key, attempt, self.config.node_id,
                                              mine, report_of(record.outcome, None, record.id,
                                                              cancelled=False))
                log.info("fleet task {key} attempt {attempt} finished before the agent "
                         "stopped: reported from the history ({answer})",
                         key=for_log(key), attempt=attempt, answer=answer)
            else:
                state = yield self._work.run(tasks.give_back, key, attempt, self.config.node_id,
                                             mine, "the agent stopped while it ran")
                log.info("fleet task {key} attempt {attempt} was running when the agent "
                         "stopped: now {state}", key=for_log(key), attempt=attempt, state=state)

    def _local_record(self, task_id_of_key: str) -> Deferred:
        history = self._engine.history
        known = history.task_for_key(task_id_of_key)
        return succeed(None) if known is None else history.get(known)

    # -- claims

    def observe(self, task: Task) -> None:
        """Engine observer: a task ended anywhere on the node, so a slot may be free."""
        if task.state == "finished":
            self._claim_soon()

    def _free_slots(self) -> int:
        lane = self._lane
        if lane.limit <= 0:
            return UNLIMITED_BATCH - len(self._runs)
        return lane.limit - lane.running - lane.waiting

    def _claim_wanted(self) -> int:
        """How many tasks to claim now: 0 while a claim is in flight, the node drains or
        holds no valid lease."""
        if (self._claiming or self._draining or not self.lease.valid
                or self.lease.generation is None):
            return 0
        return max(0, self._free_slots())

    def _claim_soon(self) -> None:
        wanted = self._claim_wanted()
        if not wanted:
            return
        self._claiming = True
        generation = self.lease.generation
        d = self._work.run(tasks.claim, self.config.node_id, generation, self.config.labels,
                           wanted)
        d.addCallbacks(self._claimed, self._claim_failed, callbackArgs=(generation, wanted))
        d.addErrback(self._unexpected, "admitting claimed tasks")

    @property
    def tasks_running(self) -> int:
        """Fleet tasks this node holds now: claimed, their results not yet recorded."""
        return len(self._runs)

    def _claimed(self, claims: list[Claim], generation: int, wanted: int) -> None:
        self._claiming = False
        self.claimed += len(claims)
        for claim in claims:
            self._admit(claim, generation)
        if len(claims) == wanted:
            self._claim_soon()  # there may be more waiting

    def _claim_failed(self, failure) -> None:
        self._claiming = False
        if not failure.check(Unavailable):  # (the Database logs that one)
            log.failure("fleet: unexpected error while claiming", failure)

    def _unexpected(self, failure, what: str) -> None:
        log.failure("fleet: unexpected error while {what}", failure, what=what)

    def _admit(self, claim: Claim, generation: int) -> None:
        run = Run(claim, generation)
        self._runs[claim.key] = run
        if self._draining:
            self._release(run)
            return
        try:
            if not claim.command:
                raise InvalidRequest('"command" must not be empty')
            request = TaskRequest(tuple(argv_item(a, "command") for a in claim.command),
                                  claim.timeout, local_id(claim.key, claim.attempt), claim.limits)
        except InvalidRequest as bad:
            self._report(run, refusal_report(f"not a valid task: {bad.message}"))
            return
        d = self._earlier_result(claim)
        d.addCallback(self._admit_unless_done, run, request)
        d.addErrback(self._unexpected, "admitting a task")

    def _earlier_result(self, claim: Claim) -> Deferred:
        """The record of an earlier attempt of this task that ended on this node (and not by
        the agent's death): its node finished it, but the result never reached the database."""
        for attempt in range(claim.attempt - 1, 0, -1):
            known = self._engine.history.task_for_key(local_id(claim.key, attempt))
            if known is not None:
                def ended(record):
                    if record is not None and record.ended and record.why_it_ended[0] != LOST:
                        return record
                    return None
                return self._engine.history.get(known).addCallback(ended)
        return succeed(None)

    def _admit_unless_done(self, record, run: Run, request: TaskRequest) -> None:
        if record is not None:
            log.info("fleet task {key}: attempt {earlier} already finished here; "
                     "reporting it for attempt {attempt}", key=for_log(run.claim.key),
                     earlier=record.request_id, attempt=run.claim.attempt)
            self._report(run, report_of(record.outcome, None, record.id, cancelled=False))
            return
        run.sink = TailSink()
        d = self._engine.admit(request, self._lane, run.sink, SOURCE,
                               launched_by=f"fleet:{run.claim.submitted_by or 'unknown'}")
        d.addCallbacks(self._admitted, self._refused, callbackArgs=(run,), errbackArgs=(run,))
        d.addErrback(self._unexpected, "admitting a task")

    def _admitted(self, decision, run: Run) -> None:
        if isinstance(decision, Replay):
            self._report(run, report_of(decision.record.outcome, None, decision.record.id,
                                        cancelled=False))
            return
        run.task = decision.task
        run.task.ended().addCallback(self._ended, run)

    def _refused(self, failure, run: Run) -> None:
        failure.trap(Refused)
        refusal = failure.value
        if isinstance(refusal, (Busy, ShuttingDown)):
            self._release(run)  # it never started: another node (or this one later) takes it
        else:
            self._report(run, refusal_report(refusal.message))

    # -- results

    def _ended(self, outcome: Outcome, run: Run) -> None:
        if run.fenced:
            self._give_back(run, "its node could not renew its lease (self-fence)")
        elif self._draining and outcome.ending is Ending.CANCELLED and not run.cancel_asked:
            if outcome.started:
                self._give_back(run, "its node stopped (drained)")
            else:
                self._release(run)
        else:
            self._report(run, report_of(outcome, run.sink, run.task.id, run.cancel_asked))

    def _report(self, run: Run, report: Report) -> None:
        """Record the result; when the freed slot may take another task, claim it in the
        same transaction (one commit a task on a busy node instead of two)."""
        claim = run.claim
        fenced = (claim.key, claim.attempt, self.config.node_id, run.generation, report)
        wanted = self._claim_wanted()
        if not wanted:
            d = self._send(tasks.report, *fenced)
        else:
            self._claiming = True
            generation = self.lease.generation
            d = self._send(tasks.report_and_claim, *fenced, generation, self.config.labels,
                           wanted)
            d.addCallbacks(self._reported_and_claimed, self._claim_failed_too,
                           callbackArgs=(generation, wanted))
        d.addCallback(self._reported, run)
        self._finish(run, d)

    def _reported_and_claimed(self, answer_and_claims, generation: int, wanted: int) -> str:
        if answer_and_claims is None:  # the door closed before the database answered
            self._claiming = False
            return None
        answer, claims = answer_and_claims
        self._claimed(claims, generation, wanted)
        return answer

    def _claim_failed_too(self, failure):
        self._claiming = False
        return failure

    def _reported(self, answer: str | None, run: Run) -> None:
        if answer is None:
            return
        self.reported[answer] = self.reported.get(answer, 0) + 1
        if answer == "stale":
            log.warn("fleet task {key}: the late result of attempt {attempt} was refused: the "
                     "attempt is no longer this node's (its lease ran out)",
                     key=for_log(run.claim.key), attempt=run.claim.attempt)

    def _give_back(self, run: Run, why: str) -> None:
        claim = run.claim
        d = self._send(tasks.give_back, claim.key, claim.attempt, self.config.node_id,
                       run.generation, why)
        d.addCallback(lambda state: log.info(
            "fleet task {key} attempt {attempt} handed back ({why}): now {state}",
            key=for_log(claim.key), attempt=claim.attempt, why=why, state=state))
        self._finish(run, d)

    def _release(self, run: Run) -> None:
        claim = run.claim
        self._finish(run, self._send(tasks.release, claim.key, claim.attempt,
                                     self.config.node_id))

    def _finish(self, run: Run, sent: Deferred) -> None:
        def forget(result):
            if self._runs.get(run.claim.key) is run:
                del self._runs[run.claim.key]
            run.done.callback(None)
            self._claim_soon()
            return result
        sent.addErrback(self._unexpected, "reporting a result")
        sent.addBoth(forget)

    def _send(self, f, *args) -> Deferred:
        """Call f on the work connection until the database answers: a result is never lost
        to a broken connection (a retry of a recorded result answers 'already')."""
        d = self._send_until_answered(f, *args)
        self._sending.add(d)
        d.addBoth(self._sent, d)
        return d

    def _sent(self, result, d):
        self._sending.discard(d)
        return result

    @inlineCallbacks
    def _send_until_answered(self, f, *args):
        delay = 0.5
        while not self._closed:
            try:
                return (yield self._work.run(f, *args))
            except Unavailable:
                yield self._sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)

    def _release_orphans(self, running: list[tuple[str, int]]) -> None:
        """Claims the database holds for this node that the node never heard of: the
        connection broke after the claim committed. Nothing ran, so they go back unrun.
        (While a claim is in flight its answer may still come, so wait for the next look;
        a run stays in _runs until its result is recorded.)"""
        if self._claiming or self._draining:
            return
        for key, attempt in running:
            if key in self._runs:
                continue
            log.warn("fleet task {key}: claimed by this node (attempt {attempt}) but the "
                     "answer was lost with the connection; queued again unrun",
                     key=for_log(key), attempt=attempt)
            self._send(tasks.release, key, attempt, self.config.node_id).addErrback(
                self._unexpected, "releasing a lost claim")

    # -- cancel, fence

    def _notified(self, channel: str, payload: str) -> None:
        if channel == tasks.CANCEL:
            self._cancel_keys([payload])
        else:
            self._claim_soon()

    def _cancel_keys(self, keys: list[str]) -> None:
        for key in keys:
            run = self._runs.get(key)
            if run is None or run.task is None or run.cancel_asked:
                continue
            run.cancel_asked = True
            log.info("fleet task {key}: cancelled by a fleet request", key=for_log(key))
            run.task.cancel("cancelled by a fleet request", self._kill_grace)

    def _fence(self) -> None:
        for run in list(self._runs.values()):
            if run.task is not None and not run.fenced:
                run.fenced = True
                run.task.cancel("fenced: this node's fleet lease could not be renewed", 0.0)

    def _lost(self) -> None:
        self._fence()
        self._joining = self._join(mine=None, first=False)
        self._joining.addErrback(lambda f: f.trap(CancelledError))

    def _prune_old(self) -> Deferred:
        """--keep-days for the fleet tables: ended tasks and gone nodes, in batches."""
        d = self._work.run(_prune_fleet, self._keep_days)
        d.addCallback(lambda n: n and log.info("fleet: pruned {n} ended task(s) and node(s) "
                                               "older than {days} days", n=n,
                                               days=self._keep_days))
        d.addErrback(lambda f: f.trap(Unavailable))
        d.addErrback(self._unexpected, "pruning")
        return None

    # -- stop: drain

    def stopService(self):
        super().stopService()
        self._draining = True
        for loop in (self._poll, self._prune):
            if loop.running:
                loop.stop()
        return self._drain()

    @inlineCallbacks
    def _drain(self):
        """Claim nothing more; the agent ends the tasks (with --shutdown-grace); report what
        finished and hand back what did not; then say the node stopped and disconnect."""
        if self._joining is not None and not self._joining.called:
            self._joining.cancel()
        registered = self.lease.generation is not None
        if registered:
            try:
                yield self.lease.set_state("draining")
            except Unavailable:
                pass
        waiting = [run.done for run in self._runs.values()]
        if waiting:
            log.info("fleet: draining {n} fleet task(s)", n=len(waiting))
        everything = DeferredList(waiting + list(self._sending), consumeErrors=True)
        everything.addTimeout(self._drain_timeout, self._reactor)
        try:
            yield everything
        except TimeoutError:
            log.error("fleet: {n} result(s) did not reach the database within {seconds} s; "
                      "the reaper queues their tasks again when this node's lease runs out",
                      n=len(self._sending), seconds=self._drain_timeout)
        if registered and self.lease.generation is not None:
            try:
                yield self.lease.set_state("stopped")
                log.info("fleet node {node} left the fleet", node=self.config.node_id)
            except Unavailable:
                log.warn("fleet node {node} could not say it stopped; its lease runs out "
                         "instead", node=self.config.node_id)
        self.lease.stop()
        self._closed = True  # what still waits for the database gives up: the lease ends it
        yield self._listener.stop()
        yield self._work.close()
        yield self._beat.close()


def _prune_fleet(conn, keep_days: float) -> int:
    pruned = 0
    while True:
        batch = tasks.prune(conn, keep_days)
        pruned += batch
        if batch < 1000:
            break
    return pruned + nodes.prune(conn, keep_days)
