"""A fleet node's lease: register, renew it by heartbeat, and stop this node's fleet tasks
(self-fence) before it can run out, so that no task of ours still runs when the database
queues it again for another node.

Timing (defaults: lease 10 s): a heartbeat every lease/5; a renewal sent at t holds the
lease until at least t + lease in the database's time, so the node fences at t + lease -
margin (margin = 30% of the lease) if nothing newer succeeded, and tells the watchdog the
same deadline, which acts even when this process is stopped (SIGSTOP) or dead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from agent.fleet import nodes, tasks
from agent.fleet.database import Database, Unavailable

log = Logger()


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    labels: dict = field(default_factory=dict)
    parallel: int = 1
    http: str | None = None
    lease: float = 10.0
    """Seconds a renewal holds the node's lease; its tasks go back to the queue this long
    after its last renewal (plus a reaper's heartbeat)."""

    @property
    def heartbeat(self) -> float:
        return self.lease / 5

    @property
    def margin(self) -> float:
        """How long before the lease's end the node stops its own tasks."""
        return self.lease * 0.3


class GenerationFile:
    """The generation this data dir last registered: on restart, the node id's live lease
    is recognised as our own (the previous run of this agent), not another agent's."""

    def __init__(self, path: Path):
        self._path = path

    def read(self) -> int | None:
        try:
            return int(self._path.read_text().strip())
        except (OSError, ValueError):
            return None

    def write(self, generation: int) -> None:
        temporary = self._path.with_suffix(".tmp")
        temporary.write_text(f"{generation}\n")
        temporary.chmod(0o600)
        temporary.replace(self._path)


class NodeLease:
    """Keeps the lease of one node: heartbeats, reaping the dead, and the fence.

    on_fence(): the lease may be running out, stop every fleet task now.
    on_lost(): the database no longer holds this generation (declared dead): fence,
    then register again. on_running(pairs): the (key, attempt) pairs the database has
    running on this generation of the node, after each renewal.
    watchdog: told each deadline (lease(seconds)), so the fence holds even if this
    process cannot act.
    """

    def __init__(self, clock, beat: Database, config: NodeConfig, *,
                 on_fence: Callable[[], None], on_lost: Callable[[], None],
                 on_cancel_requested: Callable[[list[str]], None],
                 on_running: Callable[[list[tuple[str, int]]], None] = lambda rows: None,
                 watchdog=None):
        self._clock = clock
        self._beat = beat
        self.config = config
        self._on_fence = on_fence
        self._on_lost = on_lost
        self._on_cancel_requested = on_cancel_requested
        self._on_running = on_running
        self._watchdog = watchdog
        self.generation: int | None = None
        self.valid = False
        """True while a renewal holds the lease and the node has not fenced."""
        self.renewed_at: float | None = None
        """When (clock time) the last renewal's answer came; None before the first."""
        self._fence_call = None
        self._loop: LoopingCall | None = None
        self._in_flight = False
        self.running_count: Callable[[], int] = lambda: 0

    # -- registration

    @inlineCallbacks
    def register(self, mine: int | None):
        """Register a new generation (raises nodes.NodeIdInUse); the lease holds from now."""
        sent = self._clock.seconds()
        registration = yield self._beat.run(
            nodes.register, self.config.node_id, self.config.labels, self.config.parallel,
            self.config.lease, self.config.http, mine)
        self.generation = registration.generation
        self._renewed(sent)
        return registration

    def start(self) -> None:
        self._loop = LoopingCall(self._beat_once)
        self._loop.clock = self._clock
        self._loop.start(self.config.heartbeat, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._disarm()
        if self._watchdog is not None:
            self._watchdog.no_lease()

    # -- renewal

    def _beat_once(self) -> Deferred | None:
        if self._in_flight or self.generation is None:
            return None  # the last one still waits for the database: it decides
        self._in_flight = True
        sent = self._clock.seconds()
        d = self._beat.run(_heartbeat_and_reap, self.config.node_id, self.generation,
                           self.config.lease, self.running_count())
        d.addCallbacks(self._answered, self._unanswered, callbackArgs=(sent,))
        d.addBoth(self._done)
        return None

    def _done(self, _):
        self._in_flight = False

    def _answered(self, answer, sent: float) -> None:
        held, cancels, requeued, running = answer
        for key, state in requeued:
            log.info("fleet task {key} was running on a node whose lease ran out: now {state}",
                     key=key, state=state)
        if not held:
            self._lost()
            return
        self._renewed(sent)
        if cancels:
            self._on_cancel_requested(cancels)
        self._on_running(running)

    def _unanswered(self, failure) -> None:
        failure.trap(Unavailable)  # logged by the Database; the fence timer decides

    def _renewed(self, sent: float) -> None:
        self.valid = True
        self.renewed_at = self._clock.seconds()
        self._disarm()
        fence_at = sent + self.config.lease - self.config.margin
        self._fence_call = self._clock.callLater(max(0.0, fence_at - self._clock.seconds()),
                                                 self._fence)
        if self._watchdog is not None:
            self._watchdog.lease(max(0.0, fence_at - self._clock.seconds()))

    def _disarm(self) -> None:
        if self._fence_call is not None and self._fence_call.active():
            self._fence_call.cancel()
        self._fence_call = None

    def _fence(self) -> None:
        self._fence_call = None
        self.valid = False
        log.error("fleet node {node}: the lease could not be renewed for {seconds:.1f} s; "
                  "stopping this node's fleet tasks before it runs out (self-fence)",
                  node=self.config.node_id, seconds=self.config.lease - self.config.margin)
        self._on_fence()

    def _lost(self) -> None:
        log.error("fleet node {node}: the database no longer holds this node's lease "
                  "(generation {generation}); its fleet tasks were queued again elsewhere. "
                  "Stopping ours and registering again", node=self.config.node_id,
                  generation=self.generation)
        self.valid = False
        self._disarm()
        self.generation = None
        self._on_lost()

    # -- draining

    def set_state(self, state: str) -> Deferred:
        return self._beat.run(nodes.set_state, self.config.node_id, self.generation, state)


def _heartbeat_and_reap(conn, node_id: str, generation: int, lease: float, running: int):
    """One round on the heartbeat connection: renew, then declare silent nodes dead and
    queue their tasks again (every node does it, so it happens while any node lives),
    then the cancels asked for our tasks (the poll that backs up NOTIFY) and what the
    database has running here (a claim whose answer a broken connection lost)."""
    held = nodes.heartbeat(conn, node_id, generation, lease, running)
    nodes.declare_dead(conn)
    requeued = tasks.requeue_abandoned(conn)
    if not held:
        return held, [], requeued, []
    cancels = tasks.cancel_requested(conn, node_id, generation)
    mine = [(key, attempt) for key, attempt, at, _ in tasks.running_on(conn, node_id)
            if at == generation]
    return held, cancels, requeued, mine
