"""The TCP door: newline-delimited JSON requests in, one result line per request out.

The protocol holds no task state beyond "which of my tasks are pending", so
it can cancel them when its client goes away.
"""
from __future__ import annotations

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from agent.core.engine import AlreadyKnown, Busy, Engine, Lane, ShuttingDown, Task
from agent.doors.tcp.linewriter import LineWriter
from agent.doors.tcp.wire import (BUSY_ERROR, SHUTTING_DOWN_ERROR, BadRequest, TaskRequest,
                            encode_error, encode_result, encode_result_pieces, looks_like_http,
                            parse_request)
from agent.core.outcome import Outcome
from agent.runner.process import StdoutCollector
from agent.history.replay import recorded_outcome, spooled_stdout, used_for_another_command

STREAM_ABOVE = 256 << 10
"""Results whose stdout is larger are encoded and sent piece by piece (see
agent.doors.tcp.linewriter); smaller ones are encoded whole, which is quicker."""

PROBE_INTERVAL = 0.25
"""Seconds between keep-alive spaces after the client's EOF: a write is the
only way to tell a half-close (results still wanted) from a peer that left."""

log = Logger()


@implementer(IHalfCloseableProtocol)
class TaskLineProtocol(LineReceiver):
    delimiter = b"\n"

    def __init__(self, engine: Engine, lane: Lane, timeout_unit: str, max_line: int, clock,
                 max_output: int | None = None, history=None):
        self.MAX_LENGTH = max_line
        self._history = history
        self._max_output = max_output
        self._engine = engine
        self._lane = lane
        self._timeout_unit = timeout_unit
        self._clock = clock
        self._pending: set[Task] = set()
        self._replaying = 0
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
        try:
            task = self._engine.submit(request, self._lane, StdoutCollector(), source="tcp",
                                       held=True, output_limit=self._max_output)
        except Busy:
            self._send(encode_error(BUSY_ERROR, list(request.command), request.id))
            return
        except ShuttingDown:
            self._send(encode_error(SHUTTING_DOWN_ERROR, list(request.command), request.id))
            return
        except AlreadyKnown as known:
            self._answer_known(request, known)
            return
        self._wait_for(task)

    def _refuse_http(self) -> None:
        """Close at once, answering nothing and starting nothing that follows (see looks_like_http)."""
        log.warn("security: {peer} sent an HTTP request to the TCP task door (a web page "
                 "trying to run commands, or a client pointed at the wrong port); connection "
                 "closed", peer=_describe(self.transport.getPeer()))
        self._gone = True
        self.transport.loseConnection()

    def connectionMade(self):
        self._lines = LineWriter(self.transport)

    def _wait_for(self, task: Task, request: TaskRequest | None = None) -> None:
        self._pending.add(task)
        task.ended().addCallback(self._deliver, task, request)

    def _deliver(self, outcome: Outcome, task: Task, replay_of: TaskRequest | None) -> None:
        self._pending.discard(task)
        if self._gone:
            return
        command, sink = list(task.request.command), task.sink
        extra = {"replayed": True} if replay_of is not None else None
        if not isinstance(sink, StdoutCollector):  # an HTTP task: its output is in the spool
            self._replay_from_history(replay_of, task.id)
            return
        if not outcome.started:
            self._send(encode_result(command, outcome, None, task.request.id, extra))
        elif sink.sizes[1] <= STREAM_ABOVE:
            self._send(encode_result(command, outcome, sink.text(), task.request.id, extra))
        else:
            self._lines.stream(encode_result_pieces(command, outcome, sink.drain(),
                                                    task.request.id, extra))
        self._close_when_done()

    # -- a request whose id the agent already knows: answered, never run again

    def _answer_known(self, request: TaskRequest, known: AlreadyKnown) -> None:
        if known.task is None:
            self._replay_from_history(request, known.task_id)
            return
        if known.task.request.command != request.command:
            self._send(encode_error(used_for_another_command(request.id, known.task.request.command),
                                    list(request.command), request.id))
            return
        known.task.hold()
        if isinstance(known.task.sink, StdoutCollector):
            known.task.sink.share()
        self._wait_for(known.task, request)

    def _replay_from_history(self, request: TaskRequest, task_id: str) -> None:
        if self._history is None:  # pragma: no cover - the agent always has one
            self._send(encode_error(f"id {request.id!r} was used before", list(request.command),
                                    request.id))
            return
        self._replaying += 1
        found = self._history.get(task_id)
        found.addCallback(self._send_replay, request)
        found.addErrback(self._replay_failed, request)
        found.addBoth(self._replay_done)

    def _send_replay(self, record, request: TaskRequest) -> None:
        if self._gone:
            return
        command = list(request.command)
        if record is None:  # pruned in between: it is no longer known
            self._send(encode_error(f"id {request.id!r} was used by a task since removed "
                                    "from the history", command, request.id))
        elif record.command != request.command:
            self._send(encode_error(used_for_another_command(request.id, record.command),
                                    command, request.id))
        else:
            stdout, dropped = spooled_stdout(self._history, record)
            extra = {"replayed": True, **({"output_dropped": dropped} if dropped else {})}
            self._lines.stream(encode_result_pieces(command, recorded_outcome(record), stdout,
                                                    request.id, extra))

    def _replay_failed(self, failure, request: TaskRequest) -> None:
        log.failure("answering a repeated id {id!r} from the history", failure, id=request.id)
        self._send(encode_error("the task history cannot be read; try again",
                                list(request.command), request.id))

    def _replay_done(self, _) -> None:
        self._replaying -= 1
        self._close_when_done()

    def _send(self, line: bytes) -> None:
        if not self._gone:
            self._lines.write(line)

    # -- the client going away, or only closing its side

    def readConnectionLost(self):
        self._read_closed = True
        if self._pending or self._replaying:
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
        if self._read_closed and not self._pending and not self._replaying:
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
                 max_line: int = 1 << 20, clock=None, max_output: int | None = None,
                 history=None):
        """history (the store): answers a request whose id names an ended task."""
        if clock is None:
            from twisted.internet import reactor as clock
        self.engine = engine
        self.lane = lane
        self.timeout_unit = timeout_unit
        self.max_line = max_line
        self.max_output = max_output
        self.history = history
        self.clock = clock

    def buildProtocol(self, addr):
        protocol = TaskLineProtocol(self.engine, self.lane, self.timeout_unit, self.max_line,
                                    self.clock, self.max_output, self.history)
        protocol.factory = self
        return protocol


def _describe(address) -> str:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None:
        return str(getattr(address, "name", address))
    return f"{host}:{port}"
