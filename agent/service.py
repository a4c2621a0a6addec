"""Options and the service tree: `twistd agent --help` is the option reference."""
from __future__ import annotations

import os
import signal
import threading

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import DeferredList, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from agent.core.engine import Engine, Lane
from agent.runner.escapees import EscapeeReaper
from agent.runner.fdlimit import raise_open_file_limit
from agent.runner.procinfo import kill_left_behind, proc_stat
from agent.memory import BurstRelease
from agent.doors.tcp.wire import SHUTTING_DOWN_ERROR, TIMEOUT_UNITS
from agent.runner.process import CLEANUP_DEADLINE
from agent.doors.tcp.protocol import TaskLineFactory, _describe
from agent.history.retention import Policy, Retention, parse_size
from agent.history.store import Store

log = Logger()


class Options(usage.Options):
    optParameters = [
        ["listen", "l", "tcp:3000:interface=127.0.0.1",
         "Twisted server endpoint for the TCP task protocol (tcp:3000 = all interfaces; ssl:... works)."],
        ["timeout-unit", None, "s", "Unit of a request's timeout: s or ms."],
        ["parallel", "p", 1, "Tasks running at once on the whole node, across connections; 0 = unlimited.",
         int],
        ["when-busy", None, "reject",
         "Over --parallel: reject (answer 'cannot allow concurrent executions' at once) or queue (FIFO)."],
        ["log-tasks", None, "all",
         "Which ended tasks get a log line: all, failures (anything but exit code 0) or none."],
        ["max-queue", None, 10000,
         "With --when-busy queue: most TCP tasks waiting for a slot; past it a request is "
         "answered 'cannot allow concurrent executions' at once. 0 = no bound.", int],
        ["max-line", None, 1 << 20, "Longest request line in bytes; longer ones get an error result.", int],
        ["max-output-bytes", None, 256 << 20,
         "Most stdout bytes one TCP task may write; beyond it the task is killed "
         "('output limit exceeded') and its result holds the first bytes.", int],
        ["http", None, None,
         "Twisted server endpoint for the HTTP API (e.g. tcp:8080:interface=127.0.0.1); off if not given."],
        ["token-file", None, None,
         "File holding the HTTP API's bearer token; default DATA_DIR/token, created with a random "
         "token (mode 0600) on first start."],
        ["data-dir", None, "./agent-data", "Where the task history database and task output live."],
        ["max-running", None, 64,
         "HTTP tasks running at once (apart from --parallel); over it the API answers 429. "
         "0 = unlimited.", int],
        ["max-log-bytes", None, 256 << 20,
         "Output kept per task and stream; beyond it the newest bytes are kept.", int],
        ["kill-grace", None, 5.0,
         "Seconds between SIGTERM and SIGKILL when a task is cancelled over HTTP.", float],
        ["shutdown-grace", None, 5.0,
         "Seconds running tasks get between SIGTERM and SIGKILL when the agent stops; "
         "0 = SIGKILL at once.", float],
        ["keep-days", None, 30.0,
         "Days an ended task (record and output) is kept, counted from its end; older ones are "
         "pruned at start and hourly. 0 = no age limit.", float],
        ["keep-bytes", None, 4 << 30,
         "Most bytes the data dir (database and task output) may hold; past it the oldest ended "
         "tasks are pruned at start and hourly. 0 = no size limit.", parse_size],
    ]

    optFlags = [
        ["keep-tcp-output", None,
         "Keep TCP tasks' output in the history too (as HTTP tasks' is), under --max-log-bytes; "
         "without it their records count the bytes but keep none."],
    ]

    def postOptions(self):
        if self["timeout-unit"] not in TIMEOUT_UNITS:
            raise usage.UsageError("--timeout-unit must be s or ms")
        if self["parallel"] < 0:
            raise usage.UsageError("--parallel must be 0 (unlimited) or more")
        if self["when-busy"] not in ("reject", "queue"):
            raise usage.UsageError("--when-busy must be reject or queue")
        if self["log-tasks"] not in ("all", "failures", "none"):
            raise usage.UsageError("--log-tasks must be all, failures or none")
        if self["max-queue"] < 0:
            raise usage.UsageError("--max-queue must be 0 (no bound) or more")
        if self["max-line"] < 64:
            raise usage.UsageError("--max-line must be at least 64 bytes")
        if self["max-output-bytes"] < 1:
            raise usage.UsageError("--max-output-bytes must be at least 1")
        if self["max-running"] < 0:
            raise usage.UsageError("--max-running must be 0 (unlimited) or more")
        if self["max-log-bytes"] < 1:
            raise usage.UsageError("--max-log-bytes must be at least 1")
        if not 0 <= self["kill-grace"] < float("inf"):
            raise usage.UsageError("--kill-grace must be a non-negative number of seconds")
        if not 0 <= self["shutdown-grace"] < float("inf"):
            raise usage.UsageError("--shutdown-grace must be a non-negative number of seconds")
        if not 0 <= self["keep-days"] < float("inf"):
            raise usage.UsageError("--keep-days must be 0 (no age limit) or a number of days")
        if self["keep-bytes"] < 0:
            raise usage.UsageError("--keep-bytes must be 0 (no size limit) or a size in bytes")
        if self["token-file"] is None:
            self["token-file"] = os.path.join(self["data-dir"], "token")


class AgentService(MultiService):
    """The whole agent: its doors (child services), the engine they share, and its history."""

    def __init__(self, engine: Engine, reactor, store: Store | None = None,
                 shutdown_grace: float = 0.0, handle_signals: bool = False,
                 escapees: EscapeeReaper | None = None):
        """handle_signals: the agent's own process (twistd), where a second
        SIGTERM/SIGINT while stopping should cut the grace short. escapees:
        kills what left a task's group, last when stopping (after the tasks)."""
        super().__init__()
        self.engine = engine
        self.store = store
        self.escapees = escapees
        self.shutdown_grace = shutdown_grace
        self.handle_signals = handle_signals
        self._reactor = reactor

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
        super().startService()

    def stopService(self):
        stopped = super().stopService()  # the doors stop listening first
        self._hurry_on_a_second_signal()
        ended = self._end_every_task()
        if self.escapees is not None:
            ended.addCallback(lambda _: self.escapees.stop())
        if self.store is not None:  # after the tasks, so their records reach the disk too
            ended.addCallback(lambda _: self.store.close())
        stopped = gatherResults([stopped, ended], consumeErrors=True)
        stopped.addBoth(self._exit_cleanly)
        return stopped

    def _exit_cleanly(self, result):
        """Stock twistd re-raises SIGTERM/SIGINT once the reactor stops, so the
        exit status says "killed by a signal". The agent shut down cleanly: exit 0."""
        if getattr(self._reactor, "_exitSignal", None) is not None:
            self._reactor._exitSignal = None
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


class _LoggedEndpointService(StreamServerEndpointService):
    """Says where it listens (port 0 picks a free one) and fails start-up if it cannot.

    The line is logged once the reactor runs, after its signal handlers are
    installed, so whoever waits for it may SIGTERM the agent at once.
    """

    _raiseSynchronously = True

    def __init__(self, endpoint, factory, what: str, reactor):
        super().__init__(endpoint, factory)
        self._what = what
        self._reactor = reactor

    def privilegedStartService(self):
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port):
        self._reactor.callWhenRunning(log.info, "{what} listening on {address}", what=self._what,
                                      address=_describe(port.getHost()))
        return port


def makeService(options: Options, reactor=None) -> AgentService:
    if reactor is None:
        from twisted.internet import reactor
    engine = Engine(reactor)
    engine.log_tasks = options["log-tasks"]
    store = Store(options["data-dir"], reactor, options["max-log-bytes"],
                  keep_tcp_output=bool(options["keep-tcp-output"]),
                  identify=proc_stat, end_left_behind=kill_left_behind)
    engine.observers.append(store.observe)
    engine.cleanup_observers.append(store.observe_cleanup)
    engine.history_lookup = store.task_for_key
    engine.output_taps.append(store.tap)
    agent = AgentService(engine, reactor, store, options["shutdown-grace"], handle_signals=True,
                         escapees=EscapeeReaper(reactor, engine.live.keys))
    release = BurstRelease(reactor, lambda: len(engine.live))
    engine.observers.append(release.observe)
    release.setServiceParent(agent)
    Retention(store, Policy(options["keep-days"], options["keep-bytes"]), reactor) \
        .setServiceParent(agent)
    lane = Lane(options["parallel"], queue=options["when-busy"] == "queue",
                max_waiting=options["max-queue"])
    factory = TaskLineFactory(engine, lane, options["timeout-unit"], options["max-line"], reactor,
                              max_output=options["max-output-bytes"], history=store)
    tcp = _LoggedEndpointService(serverFromString(reactor, options["listen"]), factory,
                                 "TCP task protocol", reactor)
    tcp.setServiceParent(agent)
    if options["http"]:
        _http_door(options, reactor, engine, store).setServiceParent(agent)
    return agent


def _http_door(options: Options, reactor, engine: Engine, store: Store):
    from agent.doors.http.api import make_site
    from agent.doors.http.auth import load_or_create_token

    os.makedirs(options["data-dir"], exist_ok=True)  # the token's default home
    token = load_or_create_token(options["token-file"])
    site = make_site(engine, store, Lane(options["max-running"]), token, options["kill-grace"],
                     reactor)
    return _LoggedEndpointService(serverFromString(reactor, options["http"]), site, "HTTP API",
                                  reactor)
