"""Options and the service tree: `twistd agent --help` is the option reference."""
from __future__ import annotations

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from agent.engine import Engine, Lane
from agent.messages import TIMEOUT_UNITS
from agent.protocol import TaskLineFactory, _describe

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
        ["max-line", None, 1 << 20, "Longest request line in bytes; longer ones get an error result.", int],
        ["max-output-bytes", None, 256 << 20,
         "Most stdout bytes one TCP task may write; beyond it the task is killed "
         "('output limit exceeded') and its result holds the first bytes.", int],
    ]

    def postOptions(self):
        if self["timeout-unit"] not in TIMEOUT_UNITS:
            raise usage.UsageError("--timeout-unit must be s or ms")
        if self["parallel"] < 0:
            raise usage.UsageError("--parallel must be 0 (unlimited) or more")
        if self["when-busy"] not in ("reject", "queue"):
            raise usage.UsageError("--when-busy must be reject or queue")
        if self["max-line"] < 64:
            raise usage.UsageError("--max-line must be at least 64 bytes")
        if self["max-output-bytes"] < 1:
            raise usage.UsageError("--max-output-bytes must be at least 1")


class AgentService(MultiService):
    """The whole agent: its doors (child services) and the engine they share."""

    def __init__(self, engine: Engine, reactor):
        super().__init__()
        self.engine = engine
        self._reactor = reactor

    def stopService(self):
        stopped = super().stopService()  # the doors stop listening first
        self.engine.cancel_all("agent shutting down")
        # Stock twistd re-raises SIGTERM/SIGINT once the reactor stops, so the
        # exit status says "killed by a signal". The agent shut down cleanly: exit 0.
        if getattr(self._reactor, "_exitSignal", None) is not None:
            self._reactor._exitSignal = None
        return stopped


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
    agent = AgentService(engine, reactor)
    lane = Lane(options["parallel"], queue=options["when-busy"] == "queue")
    factory = TaskLineFactory(engine, lane, options["timeout-unit"], options["max-line"], reactor,
                              max_output=options["max-output-bytes"])
    tcp = _LoggedEndpointService(serverFromString(reactor, options["listen"]), factory,
                                 "TCP task protocol", reactor)
    tcp.setServiceParent(agent)
    return agent
