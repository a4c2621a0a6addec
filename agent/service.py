"""The service tree: the doors, the engine they share and the history, built from Options."""
from __future__ import annotations

import os
import signal
import threading
from functools import partial
from pathlib import Path

from twisted.application import strports
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import DeferredList, gatherResults
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger
from zope.interface import implementer

from agent._twisted_compat import forget_exit_signal
from agent.core.engine import Engine
from agent.core.lanes import Lane
from agent.doors import mtls
from agent.doors.tcp import protected as protected_mode
from agent.doors.tcp.backlog import Backlog, Spill
from agent.doors.tcp.protocol import TaskLineFactory, _describe
from agent.doors.tcp.wire import SHUTTING_DOWN_ERROR
from agent.fdlimit import raise_open_file_limit
from agent.history import datadir
from agent.history.retention import Policy, Retention
from agent.history.store import Store
from agent.logformat import JsonLines, text_log_destination, text_observer
from agent.memory import BurstRelease, keep_freed_memory
from agent.metrics import FleetGauges, Metrics
from agent.options import Options
from agent.runner.escapees import EscapeeReaper
from agent.runner.process import CLEANUP_DEADLINE, start_task
from agent.runner.procinfo import kill_left_behind, proc_stat
from agent.runner.watchdog import Watchdog

log = Logger()


class AgentService(MultiService):
    """The whole agent: its doors (child services), the engine they share, and its history."""

    def __init__(self, engine: Engine, reactor, store: Store | None = None,
                 shutdown_grace: float = 0.0, handle_signals: bool = False,
                 escapees: EscapeeReaper | None = None, watchdog: Watchdog | None = None,
                 log_observer=None):
        """handle_signals: the agent's own process (twistd), where a second
        SIGTERM/SIGINT while stopping should cut the grace short. escapees:
        kills what left a task's group, last when stopping (after the tasks).
        watchdog: the process that kills the task groups if the agent dies; told
        "bye" when stopping, once the tasks have ended. log_observer: what
        twistd should log through (--log-format json), set on the application
        this service joins."""
        self._log_observer = log_observer
        super().__init__()
        self.engine = engine
        self.store = store
        self.escapees = escapees
        self.watchdog = watchdog
        self.shutdown_grace = shutdown_grace
        self.handle_signals = handle_signals
        self._reactor = reactor
        self.tcp_factory = None
        self.site = None
        """The doors' factories, for whoever listens on them (tests listen on port 0)."""

    def setServiceParent(self, parent):
        """twistd uses an application's ILogObserver component, if it has one, instead
        of its own text observer (twisted.application.app.AppLogger.start)."""
        if self._log_observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self._log_observer)
        return super().setServiceParent(parent)

    def privilegedStartService(self):
        raise_open_file_limit()  # before the doors accept anyone or a task starts
        super().privilegedStartService()  # the doors bind their ports first
        if self.store is not None:
            self.store.open()

    def startService(self):
        if self.store is not None:
            self.store.start()
        if self.escapees is not None:
            self.escapees.start()
        if self.watchdog is not None:  # before a door can start a task
            self.watchdog.start()
        super().startService()

    def stopService(self):
        stopped = super().stopService()  # the doors stop listening first
        self._hurry_on_a_second_signal()
        ended = self._end_every_task()
        if self.escapees is not None:
            ended.addCallback(lambda _: self.escapees.stop())
        if self.watchdog is not None:
            ended.addCallback(lambda _: self.watchdog.stop())
        if self.store is not None:  # after the tasks, so their records reach the disk too
            ended.addCallback(lambda _: self.store.close())
        stopped = gatherResults([stopped, ended], consumeErrors=True)
        stopped.addBoth(self._exit_cleanly)
        return stopped

    def _exit_cleanly(self, result):
        """Stock twistd re-raises SIGTERM/SIGINT once the reactor stops, so the
        exit status says "killed by a signal". The agent shut down cleanly: exit 0."""
        forget_exit_signal(self._reactor)
        return result

    def _hurry_on_a_second_signal(self):
        """A second SIGTERM or SIGINT (Ctrl-C again) while tasks have their grace:
        SIGKILL them now. Twisted would try to stop the stopping reactor again."""
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set signal handlers

        def hurry(number, frame):
            self._reactor.callFromThread(self._kill_now, number)
        for number in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(number) not in (signal.SIG_IGN, None):
                signal.signal(number, hurry)

    def _kill_now(self, number: int):
        if self.engine.live:
            log.warn("{signal} again while stopping: killing {n} task(s) now",
                     signal=signal.Signals(number).name, n=len(self.engine.live))
        self.engine.cancel_all(SHUTTING_DOWN_ERROR, grace=0)

    def _end_every_task(self):
        """SIGTERM every running task's group (SIGKILL after shutdown_grace), drop
        queued ones, and fire once each group is verified empty, so the history
        holds how each one ended and whether its cleanup completed."""
        tasks = list(self.engine.live.values())
        if tasks:
            running = sum(task.runner is not None for task in tasks)
            log.info("stopping: {running} running task(s) get SIGTERM, SIGKILL after {grace} s; "
                     "{queued} queued task(s) dropped", running=running,
                     grace=self.shutdown_grace, queued=len(tasks) - running)
        self.engine.cancel_all(SHUTTING_DOWN_ERROR, grace=self.shutdown_grace)  # and start none
        cleaned = DeferredList([task.cleaned() for task in tasks], consumeErrors=True)
        cleaned.addTimeout(self.shutdown_grace + CLEANUP_DEADLINE + 1.0, self._reactor)
        cleaned.addCallback(_report_unverified)
        return cleaned


def _report_unverified(results) -> None:
    """On the timeout each wait still open was cancelled: say so, and stop anyway."""
    unverified = sum(not succeeded for succeeded, _ in results)
    if unverified:
        log.error("stopping: {n} task group(s) still not verified empty; stopping anyway",
                  n=unverified)


def _door(reactor, description: str, factory, what: str, then=None) -> StreamServerEndpointService:
    """A door's listening service, which fails start-up if it cannot listen
    (strports.service raises the listen error from privilegedStartService),
    and says where it listens (port 0 picks a free one); then(address) says more,
    unless the door requires client certificates (mtls:): then it says that."""
    door = strports.service(description, factory, reactor)
    if mtls.requires_client_certificates(description):
        then = partial(_say_client_certificates, what)
    door.endpoint = _Announced(door.endpoint, what, reactor, then)
    return door


@implementer(IStreamServerEndpoint)
class _Announced:
    """An endpoint that logs the address it listens on.

    The line is logged once the reactor runs, after its signal handlers are
    installed, so whoever waits for it may SIGTERM the agent at once.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, what: str, reactor, then=None):
        """then(address): more to say once it listens."""
        self._endpoint = endpoint
        self._what = what
        self._reactor = reactor
        self._then = then

    def listen(self, factory):
        return self._endpoint.listen(factory).addCallback(self._listening)

    def _listening(self, port):
        self._reactor.callWhenRunning(log.info, "{what} listening on {address}", what=self._what,
                                      address=_describe(port.getHost()))
        if self._then is not None:
            self._reactor.callWhenRunning(self._then, port.getHost())
        return port


def _say_client_certificates(what: str, address) -> None:
    log.info("{what}: clients need a certificate signed by the door's caCerts (mtls:)", what=what)


def _say_how_protected(protected: bool, address) -> None:
    note = protected_mode.starting_note(getattr(address, "host", "127.0.0.1"), protected)
    if note is not None:
        log.warn("{note}", note=note)


def makeService(options: Options, reactor=None) -> AgentService:
    """twistd's entry point (the plugin and agent.tac): the agent as its own process."""
    if reactor is None:
        from twisted.internet import reactor
    keep_freed_memory()  # the whole process's allocator: large results reuse their pages
    return build(options, reactor, own_process=True)


def _log_observer(options: Options, reactor, own_process: bool):
    """What twistd should log through: JSON lines, or its own text lines made cheaper
    (agent.logformat) where the agent is the whole process and twistd's options say
    where the text goes; None leaves twistd to its own."""
    if options["log-format"] == "json":
        return JsonLines()
    if not own_process:
        return None
    out = text_log_destination(getattr(options, "parent", None), reactor)
    return None if out is None else text_observer(out)


def build(options: Options, reactor, *, start=start_task, own_process: bool = False,
          environ=os.environ) -> AgentService:
    """The one place the agent is wired, for makeService and for the tests.

    own_process: the agent is the whole process (twistd), so it may take
    process-wide things: signal handlers, child-subreaper status (escapees),
    and a watchdog process that kills its task groups if it dies.
    start: how a task's process is started (tests pass a fake spawner).
    """
    store = Store(options["data-dir"], reactor, options["max-log-bytes"],
                  keep_tcp_output=bool(options["keep-tcp-output"]),
                  identify=proc_stat, end_left_behind=kill_left_behind,
                  keep_bytes=options["keep-bytes"])
    retention = Retention(store, Policy(options["keep-days"], options["keep-bytes"]), reactor)
    release = BurstRelease(reactor, lambda: len(engine.live))
    metrics = Metrics(live=lambda: engine.live.values(), health=store.health,
                      usage=lambda: store.last_usage,
                      escapees_killed=lambda: None if escapees is None else escapees.killed,
                      fleet=lambda: _fleet_gauges(agent.fleet, reactor))
    watchdog = Watchdog(reactor) if own_process else None
    fleet_doors: list = []  # told of every task's end: a slot a fleet task may take
    observers = [release.observe, retention.observe, metrics.observe,
                 partial(_tell_each, fleet_doors)]
    cleanup_observers = [metrics.observe_cleanup]
    if watchdog is not None:
        observers.insert(0, watchdog.observe)  # first: a task is guarded as soon as it starts
        cleanup_observers.append(watchdog.observe_cleanup)
    engine = Engine(reactor, store, start=start, log_tasks=options["log-tasks"],
                    observers=observers, cleanup_observers=cleanup_observers,
                    refusal_observers=[metrics.refused], allow=options.allow)
    escapees = EscapeeReaper(reactor, engine.live.keys) if own_process else None
    agent = AgentService(engine, reactor, store, options["shutdown-grace"],
                         handle_signals=own_process, escapees=escapees, watchdog=watchdog,
                         log_observer=_log_observer(options, reactor, own_process))
    release.setServiceParent(agent)
    retention.setServiceParent(agent)
    lane = Lane(options["parallel"], queue=options["when-busy"] == "queue",
                max_waiting=options["max-queue"], max_waiting_bytes=options["max-queue-bytes"])
    protected = (options["protected-mode"] == "yes"  # an mtls: door authenticates its clients
                 and not mtls.requires_client_certificates(options["listen"]))
    agent.tcp_factory = TaskLineFactory(engine, lane, options["timeout-unit"], options["max-line"],
                                        clock=reactor, max_output=options["max-output-bytes"],
                                        protected=protected, backlog=_backlog(options, reactor),
                                        max_connections=options["max-connections"],
                                        line_timeout=options["line-timeout"])
    _door(reactor, options["listen"], agent.tcp_factory, "TCP task protocol",
          then=partial(_say_how_protected, protected)).setServiceParent(agent)
    agent.fleet = None
    if options.fleet_dsn is not None:
        agent.fleet = _fleet_door(options, reactor, engine, lane, watchdog)
        fleet_doors.append(agent.fleet)
        agent.fleet.setServiceParent(agent)
    if options["http"]:
        fleet_db = _http_fleet_database(options, reactor)
        if fleet_db is not None:  # before the door: services stop in reverse, so it closes after
            _Closing(fleet_db).setServiceParent(agent)
        agent.site = _http_site(options, reactor, engine, store, metrics, environ, fleet_db)
        _door(reactor, options["http"], agent.site, "HTTP API").setServiceParent(agent)
    return agent


def _fleet_gauges(door, clock) -> FleetGauges | None:
    """The fleet door's figures for GET /metrics; None without --fleet."""
    if door is None:
        return None
    renewed = door.lease.renewed_at
    return FleetGauges(running=door.tasks_running, lease_valid=door.lease.valid,
                       since_renewal=None if renewed is None else clock.seconds() - renewed,
                       claims=door.claimed, reports=dict(door.reported))


def _tell_each(doors: list, task) -> None:
    for door in doors:
        door.observe(task)


def _fleet_door(options: Options, reactor, engine: Engine, lane: Lane,
                watchdog: Watchdog | None):
    """This node as a worker of the fleet's queue: two connections (claims and reports;
    heartbeats) and a listening one, each on its own thread."""
    from agent.doors.fleet.door import FleetDoor
    from agent.doors.fleet.lease import GenerationFile, NodeConfig
    from agent.fleet import dsn as dsns
    from agent.fleet import tasks
    from agent.fleet.database import Database, Listener

    dsn = options.fleet_dsn
    config = NodeConfig(options["node-id"], options.labels, options["parallel"],
                        http=options["fleet-url"], lease=options["fleet-lease"])
    datadir.prepare(Path(options["data-dir"]))
    return FleetDoor(
        engine, lane, reactor, work=Database(reactor, dsn, "work"),
        beat=Database(reactor, dsn, "heartbeat"), config=config,
        generation_file=GenerationFile(Path(options["data-dir"]) / "fleet-generation"),
        listener=partial(Listener, reactor, dsn, (tasks.QUEUED, tasks.CANCEL)),
        where=dsns.for_log(dsn), watchdog=watchdog, kill_grace=options["kill-grace"],
        poll=options["fleet-poll"],
        drain_timeout=options["shutdown-grace"] + 10.0, keep_days=options["keep-days"])


def _backlog(options: Options, reactor) -> Backlog:
    """Results waiting for slow TCP clients: past the bound, to files in the data dir,
    written on the reactor's thread pool."""
    def in_thread(f, *args):
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)
    return Backlog(options["max-pending-output"], Spill(options["data-dir"], in_thread))


def _http_fleet_database(options: Options, reactor):
    """The HTTP door's own connection to the fleet (GET /fleet/...), apart from the fleet
    door's: a slow listing never delays a claim or a heartbeat. None without --fleet."""
    if options.fleet_dsn is None:
        return None
    from agent.fleet.database import Database
    return Database(reactor, options.fleet_dsn, "http")


class _Closing(Service):
    """Closes a fleet Database (its connection, then its thread) when the agent stops."""

    def __init__(self, database):
        self._database = database

    def stopService(self):
        super().stopService()
        return self._database.close()


def _http_site(options: Options, reactor, engine: Engine, store: Store, metrics: Metrics,
               environ, fleet=None):
    from agent.doors.http.api import make_site
    from agent.doors.http.auth import TokenAuth, load_or_create_token

    datadir.prepare(Path(options["data-dir"]))  # the token's default home
    auth = TokenAuth(options.principals)
    if options.admin_token_wanted:
        auth = auth.with_admin(load_or_create_token(options["token-file"]))
    return make_site(engine, store, Lane(options["max-running"]), auth, options["kill-grace"],
                     reactor, environ, metrics=metrics, fleet=fleet)
