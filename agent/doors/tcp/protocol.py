"""The TCP door: newline-delimited JSON requests in, one result line per request out.

The protocol holds no task state beyond "which of my tasks are pending", so
it can cancel them when its client goes away.
"""
from __future__ import annotations

from twisted.internet.interfaces import IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from agent.core.decisions import (Attached, Busy, Decision, KeyForgotten, Refused, ShuttingDown,
                                  Started)
from agent.core.engine import Engine
from agent.core.lanes import Lane
from agent.core.request import TaskRequest
from agent.core.task import Task
from agent.doors.tcp import protected as protected_mode
from agent.doors.tcp.linewriter import LineWriter
from agent.doors.tcp.wire import (BUSY_ERROR, SHUTTING_DOWN_ERROR, BadRequest,
                            encode_error, encode_result, encode_result_pieces, looks_like_http,
                            parse_request)
from agent.core.outcome import Outcome
from agent.runner.process import StdoutCollector
from agent.history.replay import spooled_stdout

STREAM_ABOVE = 256 << 10
"""Results whose stdout is larger are encoded and sent piece by piece (see
agent.doors.tcp.linewriter); smaller ones are encoded whole, which is quicker."""

PROBE_INTERVAL = 0.25
"""Seconds between keep-alive spaces after the client's EOF: a write is the
only way to tell a half-close (results still wanted) from a peer that left."""

log = Logger()

_WIRE_ERRORS = {Busy: BUSY_ERROR, ShuttingDown: SHUTTING_DOWN_ERROR}
"""Refusals whose TCP error text the protocol fixes (seed A's words); the others send their message."""


@implementer(IHalfCloseableProtocol)
class TaskLineProtocol(LineReceiver):
    delimiter = b"\n"

    def __init__(self, engine: Engine, lane: Lane, timeout_unit: str, max_line: int, clock,
                 max_output: int | None = None):
        self.MAX_LENGTH = max_line
        self._max_output = max_output
        self._engine = engine
        self._lane = lane
        self._timeout_unit = timeout_unit
        self._clock = clock
        self._pending: set[Task] = set()
        self._answering = 0
        """Requests admitted or refused but not yet answered on the wire."""
        self._read_closed = False
        self._gone = False
        self._skipping_long_line = False
        self._after_long_line = b""
        self._probe: LoopingCall | None = None

    # -- bytes to lines, surviving over-long lines

    def dataReceived(self, data: bytes):
        while data and not self._gone:
            if self._skipping_long_line:
                end = data.find(self.delimiter)
                if end < 0:
                    return
                self._skipping_long_line = False
                data = data[end + 1:]
            super().dataReceived(data)
            data, self._after_long_line = self._after_long_line, b""

    def lineLengthExceeded(self, buffered: bytes):
        """Answer the over-long line with an error and go on with the next one."""
        self._send(encode_error(f"request line is longer than {self.MAX_LENGTH} bytes"))
        end = buffered.find(self.delimiter)
        if end < 0:
            self._skipping_long_line = True
        else:
            self._after_long_line = buffered[end + 1:]

    # -- lines to tasks

    def lineReceived(self, line: bytes):
        if not line.strip():
            return
        if looks_like_http(line):
            self._refuse_http()
            return
        try:
            request = parse_request(line.rstrip(b"\r"), self._timeout_unit)
        except BadRequest as e:
            self._send(encode_error(e.message, e.command, e.id))
            return
        self._answering += 1
        decided = self._engine.admit(request, self._lane, StdoutCollector(), "tcp", held=True,
                                     launched_by=self._launched_by,
                                     output_limit=self._max_output)
        decided.addCallbacks(self._admitted, self._refused, callbackArgs=(request,),
                             errbackArgs=(request,))
        decided.addErrback(self._replay_failed, request)
        decided.addBoth(self._answered)

    def _refuse_http(self) -> None:
        """Close at once, answering nothing and starting nothing that follows (see looks_like_http)."""
        log.warn("security: {peer} sent an HTTP request to the TCP task door (a web page "
                 "trying to run commands, or a client pointed at the wrong port); connection "
                 "closed", peer=_describe(self.transport.getPeer()))
        self._gone = True
        self.transport.loseConnection()

    def connectionMade(self):
        self._lines = LineWriter(self.transport)
        self._launched_by = "tcp:" + _describe(self.transport.getPeer())
        """Who the tasks of this connection are recorded as launched by."""

    # -- the engine's decision, in the wire format

    def _admitted(self, decision: Decision, request: TaskRequest):
        if isinstance(decision, Started):
            self._pending.add(decision.task)
            return decision.task.ended().addCallback(self._deliver, decision.task)
        if isinstance(decision, Attached):
            self._pending.add(decision.task)
            ended = decision.task.ended()
            ended.addCallback(self._left_pending, decision.task)
            ended.addCallback(lambda _: self._engine.history.get(decision.task.id))
            return ended.addCallback(self._send_replay, request)
        return self._send_replay(decision.record, request)

    def _refused(self, failure, request: TaskRequest) -> None:
        failure.trap(Refused)
        self._send(encode_error(_WIRE_ERRORS.get(type(failure.value), failure.value.message),
                                list(request.command), request.id))

    def _left_pending(self, result, task: Task):
        self._pending.discard(task)
        return result

    def _deliver(self, outcome: Outcome, task: Task) -> None:
        self._pending.discard(task)
        if self._gone:
            return
        command, sink = list(task.request.command), task.sink
        if not outcome.started:
            self._send(encode_result(command, outcome, None, task.request.id))
        elif sink.sizes[1] <= STREAM_ABOVE:
            self._send(encode_result(command, outcome, sink.text(), task.request.id))
        else:
            self._lines.stream(encode_result_pieces(command, outcome, sink.drain(),
                                                    task.request.id))

    def _send_replay(self, record, request: TaskRequest) -> None:
        """The ended task's result as the original client got it (the history keeps the
        stdout of every task with an id), marked "replayed"."""
        if self._gone:
            return
        if record is None:  # removed from the history the moment it ended
            raise KeyForgotten(request.id)
        stdout, dropped = spooled_stdout(self._engine.history, record)
        extra = {"replayed": True, **({"output_dropped": dropped} if dropped else {})}
        self._lines.stream(encode_result_pieces(list(request.command), record.outcome,
                                                stdout, request.id, extra))

    def _replay_failed(self, failure, request: TaskRequest) -> None:
        if failure.check(Refused):
            return self._refused(failure, request)
        log.failure("answering a repeated id {id!r} from the history", failure, id=request.id)
        self._send(encode_error("the task history cannot be read; try again",
                                list(request.command), request.id))

    def _answered(self, _) -> None:
        self._answering -= 1
        self._close_when_done()

    def _send(self, line: bytes) -> None:
        if not self._gone:
            self._lines.write(line)

    # -- the client going away, or only closing its side

    def readConnectionLost(self):
        self._read_closed = True
        if self._answering:
            self._probe = LoopingCall(self._probe_peer)
            self._probe.clock = self._clock
            self._probe.start(PROBE_INTERVAL, now=False)
        self._close_when_done()

    def _probe_peer(self) -> None:
        """A space between lines; none while a line is being streamed, which is a write itself."""
        if self._lines.idle:
            self.transport.write(b" ")

    def writeConnectionLost(self):
        self.transport.loseConnection()

    def _close_when_done(self) -> None:
        if self._read_closed and not self._answering:
            self._stop_probing()
            self.transport.loseConnection()

    def _stop_probing(self) -> None:
        """Stop, and let go: the LoopingCall holds a bound method of this protocol."""
        if self._probe is not None and self._probe.running:
            self._probe.stop()
        self._probe = None

    def connectionLost(self, reason):
        self._gone = True
        self._stop_probing()
        pending, self._pending = self._pending, set()
        if pending:
            log.info("client {peer} went away; ending its {n} pending task(s)",
                     peer=_describe(self.transport.getPeer()), n=len(pending))
        self._engine.release_many(pending, "client disconnected")


class TaskLineFactory(Factory):
    """Builds one TaskLineProtocol per connection, all sharing one engine and lane."""

    noisy = False

    def __init__(self, engine: Engine, lane: Lane, timeout_unit: str = "s",
                 max_line: int = 1 << 20, *, clock: IReactorTime, max_output: int | None = None,
                 protected: bool = True):
        """protected: answer only peers on this host (agent.doors.tcp.protected); off
        only when the operator said so, or when the endpoint authenticates its clients."""
        self.protected = protected
        self.engine = engine
        self.lane = lane
        self.timeout_unit = timeout_unit
        self.max_line = max_line
        self.max_output = max_output
        self.clock = clock

    def buildProtocol(self, addr):
        if self.protected and not protected_mode.is_local(addr):
            return protected_mode.Refusal(encode_error(protected_mode.REFUSAL))
        protocol = TaskLineProtocol(self.engine, self.lane, self.timeout_unit, self.max_line,
                                    self.clock, self.max_output)
        protocol.factory = self
        return protocol


def _describe(address) -> str:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None:
        return str(getattr(address, "name", address))
    return f"{host}:{port}"
