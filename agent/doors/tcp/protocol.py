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

from agent.core.decisions import (Attached, Busy, Decision, KeyForgotten, QueueFull, Refused,
                                  ShuttingDown, Started)
from agent.core.engine import Engine
from agent.core.lanes import Lane
from agent.core.request import TaskRequest
from agent.core.task import Task
from agent.doors.tcp import protected as protected_mode
from agent.doors.tcp.guards import ConnectionCap, line_timed_out
from agent.doors.tcp.linewriter import Budget, Line, LineWriter
from agent.tls import peer_certificate_subject
from agent.doors.tcp.collector import ResultOutput
from agent.doors.tcp.wire import (BUSY_ERROR, SHUTTING_DOWN_ERROR, BadRequest,
                            encode_error, encode_result, encode_result_escaped,
                            encode_result_pieces, looks_like_http, parse_request)
from agent.core.outcome import Outcome
from agent.history.replay import spooled_stdout


PROBE_INTERVAL = 0.25
"""Seconds between keep-alive spaces after the client's EOF: a write is the
only way to tell a half-close (results still wanted) from a peer that left."""

log = Logger()

_LATER = object()
"""What _admitted returns for a started task: its answer is counted when it is delivered."""

_WIRE_ERRORS = {Busy: BUSY_ERROR, QueueFull: BUSY_ERROR,
                ShuttingDown: SHUTTING_DOWN_ERROR}
"""Refusals whose TCP error text the protocol fixes (seed A's words); the others send their message."""


@implementer(IHalfCloseableProtocol)
class TaskLineProtocol(LineReceiver):
    delimiter = b"\n"

    def __init__(self, engine: Engine, lane: Lane, timeout_unit: str, max_line: int, clock,
                 max_output: int | None = None, *, backlog: Budget | None = None,
                 line_timeout: float = 0, connections: ConnectionCap | None = None):
        """backlog: bounds the results waiting for clients across connections
        (agent.doors.tcp.backlog); line_timeout: seconds a partial request line may
        wait for its next byte (0 = for ever); connections: the door's open connections."""
        self.MAX_LENGTH = max_line
        self._backlog = backlog
        self._line_timeout = line_timeout
        self._connections = connections or ConnectionCap(0)
        self._line_timer = None
        self._partial_line = False
        self._reading_paused = False
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
        self._read_lines(data)
        self._partial_line = not data.endswith(self.delimiter)
        self._time_partial_line()

    def _read_lines(self, data: bytes):
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
        self._engine.refused("tcp", "too_large")
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
            self._engine.refused("tcp", "bad_request")
            return
        self._answering += 1
        decided = self._engine.admit(request, self._lane, ResultOutput(), "tcp", held=True,
                                     launched_by=self._who(),
                                     output_limit=self._max_output)
        decided.addCallbacks(self._admitted, self._not_admitted, callbackArgs=(request,),
                             errbackArgs=(request,))
        decided.addBoth(self._answered)

    def _who(self) -> str:
        """cert:SUBJECT for a client that proved a certificate (an mtls: door), else
        tcp:HOST:PORT. Asked at the first request, once the TLS handshake is done."""
        if self._launched_by is None:
            subject = peer_certificate_subject(self.transport)
            self._launched_by = (f"cert:{subject}" if subject is not None
                                 else "tcp:" + _describe(self.transport.getPeer()))
        return self._launched_by

    def _refuse_http(self) -> None:
        """Close at once, answering nothing and starting nothing that follows (see looks_like_http)."""
        log.warn("security: {peer} sent an HTTP request to the TCP task door (a web page "
                 "trying to run commands, or a client pointed at the wrong port); connection "
                 "closed", peer=_describe(self.transport.getPeer()))
        self._gone = True
        self._lines.close()

    def connectionMade(self):
        self._connections.joined()
        self._lines = LineWriter(self.transport, self._backlog, self._results_stuck)
        self._launched_by: str | None = None
        """Who the tasks of this connection are recorded as launched by (see _who)."""

    # -- clients that stall: a partial line for too long, results not taken

    def _time_partial_line(self) -> None:
        """A partial line may wait line_timeout for its next byte, unless the agent
        itself stopped reading (see _results_stuck)."""
        waiting = (self._partial_line and self._line_timeout > 0 and not self._reading_paused
                   and not self._gone and not self._read_closed)
        if self._line_timer is not None and self._line_timer.active():
            if waiting:
                self._line_timer.reset(self._line_timeout)
                return
            self._line_timer.cancel()
        self._line_timer = None
        if waiting:
            self._line_timer = self._clock.callLater(self._line_timeout, self._line_stalled)

    def _line_stalled(self) -> None:
        self._line_timer = None
        log.info("client {peer} sent part of a request line and nothing more for {seconds} s; "
                 "connection closed", peer=_describe(self.transport.getPeer()),
                 seconds=self._line_timeout)
        self._send(encode_error(line_timed_out(self._line_timeout)))
        self._gone = True
        self._lines.close()
        self._release_pending("client stalled mid-line")

    def _results_stuck(self, stuck: bool) -> None:
        """Take no new request from a client that does not take its results: it could
        otherwise keep starting tasks whose output only piles up here."""
        if self._read_closed or self._gone or stuck == self._reading_paused:
            return
        self._reading_paused = stuck
        if stuck:
            self.transport.pauseProducing()
        else:
            self.transport.resumeProducing()
        self._time_partial_line()

    # -- the engine's decision, in the wire format

    def _admitted(self, decision: Decision, request: TaskRequest):
        if isinstance(decision, Started):  # the common case: no chained Deferred
            self._pending.add(decision.task)
            decision.task.ended().addCallback(self._deliver, decision.task) \
                .addBoth(self._answered)
            return _LATER
        if isinstance(decision, Attached):
            self._pending.add(decision.task)
            ended = decision.task.ended()
            ended.addCallback(self._left_pending, decision.task)
            ended.addCallback(lambda _: self._engine.history.get(decision.task.id))
            ended.addCallback(self._send_replay, request)
            return ended.addErrback(self._not_admitted, request)
        return self._send_replay(decision.record, request)

    def _not_admitted(self, failure, request: TaskRequest) -> None:
        """A refusal in its wire words; anything else is the history failing a replay."""
        if failure.check(Refused):
            message = _WIRE_ERRORS.get(type(failure.value), failure.value.message)
        else:
            log.failure("answering a repeated id {id!r} from the history", failure,
                        id=request.id)
            message = "the task history cannot be read; try again"
        self._send(encode_error(message, list(request.command), request.id))

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
        elif not sink.escaped:
            self._send(encode_result(command, outcome, sink.text(), task.request.id))
        else:
            self._lines.queue(Line.encoded(
                lambda pieces: encode_result_escaped(command, outcome, pieces, task.request.id),
                sink.pieces(), sink.held))

    def _send_replay(self, record, request: TaskRequest) -> None:
        """The ended task's result as the original client got it (the history keeps the
        stdout of every task with an id), marked "replayed"."""
        if self._gone:
            return
        if record is None:  # removed from the history the moment it ended
            raise KeyForgotten(request.id)
        stdout, dropped = spooled_stdout(self._engine.history, record)
        extra = {"replayed": True, **({"output_dropped": dropped} if dropped else {})}
        self._lines.queue(Line.encoded(  # 0 bytes held: read from the history as it goes
            lambda chunks: encode_result_pieces(list(request.command), record.outcome, chunks,
                                                request.id, extra), stdout, 0))

    def _answered(self, result) -> None:
        if result is _LATER:
            return
        self._answering -= 1
        self._close_when_done()

    def _send(self, line: bytes) -> None:
        if not self._gone:
            self._lines.write(line)

    # -- the client going away, or only closing its side

    def readConnectionLost(self):
        self._read_closed = True
        self._time_partial_line()
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
        self._lines.abandon()

    def _close_when_done(self) -> None:
        if self._read_closed and not self._answering:
            self._stop_probing()
            self._lines.close()

    def _stop_probing(self) -> None:
        """Stop, and let go: the LoopingCall holds a bound method of this protocol."""
        if self._probe is not None and self._probe.running:
            self._probe.stop()
        self._probe = None

    def connectionLost(self, reason):
        self._gone = True
        self._connections.left()
        self._lines.stopProducing()  # as the transport does: what waits for this client goes
        self._time_partial_line()
        self._stop_probing()
        self._release_pending("client disconnected")

    def _release_pending(self, message: str) -> None:
        pending, self._pending = self._pending, set()
        if pending:
            log.info("client {peer} went away; ending its {n} pending task(s)",
                     peer=_describe(self.transport.getPeer()), n=len(pending))
        self._engine.release_many(pending, message)


class TaskLineFactory(Factory):
    """Builds one TaskLineProtocol per connection, all sharing one engine and lane."""

    noisy = False

    def __init__(self, engine: Engine, lane: Lane, timeout_unit: str = "s",
                 max_line: int = 1 << 20, *, clock: IReactorTime, max_output: int | None = None,
                 protected: bool = True, backlog: Budget | None = None,
                 max_connections: int = 0, line_timeout: float = 0):
        """protected: answer only peers on this host (agent.doors.tcp.protected); off
        only when the operator said so, or when the endpoint authenticates its clients.
        backlog: bounds what waits for slow clients (agent.doors.tcp.backlog);
        max_connections (0 = no cap) and line_timeout (0 = none): agent.doors.tcp.guards."""
        self.protected = protected
        self.backlog = backlog
        self.connections = ConnectionCap(max_connections)
        self.line_timeout = line_timeout
        self.engine = engine
        self.lane = lane
        self.timeout_unit = timeout_unit
        self.max_line = max_line
        self.max_output = max_output
        self.clock = clock

    def buildProtocol(self, addr):
        if self.protected and not protected_mode.is_local(addr):
            return protected_mode.Refusal(encode_error(protected_mode.REFUSAL))
        if not self.connections.admits():
            return self.connections.refusal()
        protocol = TaskLineProtocol(self.engine, self.lane, self.timeout_unit, self.max_line,
                                    self.clock, self.max_output, backlog=self.backlog,
                                    line_timeout=self.line_timeout,
                                    connections=self.connections)
        protocol.factory = self
        return protocol


def _describe(address) -> str:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None:
        return str(getattr(address, "name", address))
    return f"{host}:{port}"
