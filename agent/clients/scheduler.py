"""`agent-scheduler`: send task requests to one or more agents and print the results.

    agent-scheduler [--agent HOST:PORT]... [--pace MS] [--ca CA.pem [--cert C --key K]] [FILE]
    agent-scheduler --fleet DSN [--fleet-password-file FILE] [--no-wait] [FILE]

Three modes:
- default: each agent connection carries one task at a time; a task answered
  "cannot allow concurrent executions" goes back to the head of the queue for
  the next free agent (the same one after a back-off when it is alone), so a
  batch finishes as fast as the nodes allow and every task runs exactly once;
  a task with an id whose connection drops mid-task is asked for again on the
  same agent, which answers a known id with its result instead of running it;
- --pace MS: seed A's reference scheduler, exactly: one connection to the
  first agent, a request line every MS milliseconds without waiting, then as
  many result lines as were sent, each within 10 s.

- --fleet DSN: no agent is named; the batch goes to the fleet's queue in
  PostgreSQL, where every agent started with --fleet takes work from (see
  agent.clients.fleet_submit), and each result is read back from there.

With --ca every connection is TLS: the agent's certificate must be signed by
--ca for the HOST of --agent; --cert and --key show the client certificate an
`mtls:` door asks for.

Results go to stdout byte for byte as the agent wrote them (one line each, in
arrival order); a summary goes to stderr. Exit status: 0 when every task got a
result, 1 when some did not, 2 for bad arguments or input.
"""
from __future__ import annotations

import json
import os
import sys
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from OpenSSL import SSL
from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredQueue, TimeoutError, fail, succeed
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint,
                                        connectProtocol, wrapClientTLS)
from twisted.internet.error import ConnectError, ConnectionDone
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.ssl import VerificationError
from twisted.protocols.basic import LineReceiver
from twisted.python import usage
from twisted.python.failure import Failure
from zope.interface import implementer

from agent.clients.batch import InputError, Summary, parse_requests, read_input
from agent.clients.progress import Progress
from agent.doors.tcp.wire import BUSY_ERROR, TIMEOUT_UNITS
from agent.tls import ClientTLS, tls_error_text

DEFAULT_AGENT = "127.0.0.1:3000"
CONNECT_TIMEOUT = 10.0
PACED_RESULT_DEADLINE = 10.0
FIRST_BACKOFF, MAX_BACKOFF = 0.05, 1.0
MAX_RECONNECTS = 3
"""Times a task with an id is asked for again on its agent after the connection dropped."""
MAX_RESULT_LINE = 1 << 30  # a result carries a task's whole stdout, JSON-escaped


# -- pure parts: addresses, back-off (the input and the summary: agent.clients.batch)


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT, with [brackets] allowed around an IPv6 host."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise usage.UsageError(f"--agent wants HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def backoff(streak: int) -> float:
    """Seconds to leave a node alone after `streak` + 1 busy answers in a row."""
    return min(FIRST_BACKOFF * 2 ** streak, MAX_BACKOFF)


# -- one connection


class Result(NamedTuple):
    raw: bytes  # the agent's line, printed as is
    fields: dict  # the same, parsed, for the summary and for retries


class _Closed:
    """Put on the result queue when the connection ends."""


@implementer(IHandshakeListener)
class AgentConnection(LineReceiver):
    """One connection to an agent: write requests, take result lines in arrival order."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_RESULT_LINE

    def __init__(self):
        self.results: DeferredQueue = DeferredQueue()
        self.lost = False
        self.problem: str | None = None  # why we dropped the connection ourselves
        self._partial: list[bytes] = []
        self._partial_size = 0
        self._secured = False
        self._lost_reason = None
        self._awaiting_handshake: list[Deferred] = []

    def handshakeCompleted(self) -> None:
        """TLS only: the agent's certificate was verified."""
        self._secured = True
        waiting, self._awaiting_handshake = self._awaiting_handshake, []
        for d in waiting:
            d.callback(self)

    def secured(self) -> Deferred:
        """Fires once the TLS handshake completed; fails with why if the connection ended first."""
        if self._secured:
            return succeed(self)
        if self.lost:
            return fail(self._lost_reason)
        d = Deferred()
        self._awaiting_handshake.append(d)
        return d

    def send(self, request: dict) -> None:
        self.transport.write(json.dumps(request).encode() + b"\n")

    def dataReceived(self, data: bytes) -> None:
        """Split lines in linear time.

        LineReceiver re-copies and re-scans its whole buffer for every chunk,
        which turns one 256 MiB result into minutes of CPU; here a partial
        line is kept as a list of chunks and joined once.
        """
        start = 0
        while self.problem is None and not self.lost and not self.transport.disconnecting:
            end = data.find(b"\n", start)
            if end < 0:
                self._keep(data[start:])
                return
            piece = data[start:end]
            if self._partial:
                piece = b"".join(self._partial) + piece
                self._partial, self._partial_size = [], 0
            start = end + 1
            if len(piece) > self.MAX_LENGTH:
                self.lineLengthExceeded(piece)
                return
            self.lineReceived(piece)

    def _keep(self, chunk: bytes) -> None:
        if chunk:
            self._partial.append(chunk)
            self._partial_size += len(chunk)
            if self._partial_size > self.MAX_LENGTH:
                self.lineLengthExceeded(b"")

    def lineLengthExceeded(self, line: bytes) -> None:
        self._drop(f"sent a line longer than {self.MAX_LENGTH} bytes")

    def lineReceived(self, line: bytes) -> None:
        raw = line.strip()  # the agent may write spaces as keep-alive probes
        if not raw:
            return
        try:
            fields = json.loads(raw)
        except ValueError:
            fields = None
        if not isinstance(fields, dict):
            self._drop(f"sent a line that is not a JSON object: {raw[:80]!r}")
            return
        self.results.put(Result(raw, fields))

    def _drop(self, problem: str) -> None:
        """A peer that breaks the protocol cannot be trusted with the next task."""
        self.problem = problem
        self._partial, self._partial_size = [], 0
        self.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        self.lost = True
        self._lost_reason = reason = reason or Failure(ConnectionDone())
        if self.problem is None and reason.check(SSL.Error, VerificationError):
            self.problem = f"ended TLS ({tls_error_text(reason.value)})"
        waiting, self._awaiting_handshake = self._awaiting_handshake, []
        for d in waiting:
            d.errback(reason)
        self.results.put(_Closed)

    async def next_result(self, clock, deadline: float | None = None) -> Result | type[_Closed]:
        """The next result line, or _Closed; TimeoutError after `deadline` seconds."""
        d = self.results.get()
        if deadline is not None:
            d.addTimeout(deadline, clock)
        return await d


# -- the default mode's work queue


@dataclass
class _Task:
    request: dict
    attempts: int = 0  # busy answers so far
    reconnects: int = 0  # times asked for again after the connection dropped mid-task


class _Batch:
    """The tasks of a spread run, shared by one worker per agent.

    An idle worker waits here instead of leaving while tasks are in flight
    elsewhere: one of them may come back busy and should go to the idle node
    rather than back to the busy one.
    """

    def __init__(self, requests: list[dict]):
        self.queue = deque(_Task(request) for request in requests)
        self.in_flight = 0
        self._idle: list[Deferred] = []

    async def take(self) -> _Task | None:
        """The next task, or None once nothing is queued or can come back."""
        while not self.queue:
            if not self.in_flight:
                return None
            waiting = Deferred()
            self._idle.append(waiting)
            await waiting
        self.in_flight += 1
        return self.queue.popleft()

    def give_back(self, item: _Task) -> None:
        """Queue `item` first again: it keeps its place in the batch."""
        self.in_flight -= 1
        self.queue.appendleft(item)
        self._wake()

    def finish(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        idle, self._idle = self._idle, []
        for waiting in idle:
            waiting.callback(None)


# -- the two modes


class Scheduler:
    """Runs one batch; `out` takes bytes (the results), `err` text (complaints)."""

    def __init__(self, reactor, agents: list[tuple[str, int]], out=None, err=None,
                 tls: ClientTLS | None = None, progress: Progress | None = None):
        """tls: connect with TLS, verifying each agent's certificate for its host.
        progress: the line a terminal shows while the batch runs (None: no line)."""
        self._progress = progress
        self._reactor = reactor
        self._agents = agents
        self._tls = tls
        self._out = out if out is not None else sys.stdout.buffer
        self._err = err if err is not None else sys.stderr
        self._started = reactor.seconds()
        self.summary = Summary()

    def summary_line(self) -> str:
        return self.summary.line(self._reactor.seconds() - self._started)

    async def connect(self, address: tuple[str, int]) -> AgentConnection | None:
        try:
            connection = await connectProtocol(_endpoint(self._reactor, *address, self._tls),
                                               AgentConnection())
            if self._tls is not None:  # else a refused certificate would look like a drop
                await self._handshake(connection)
            return connection
        except Exception as e:
            self._complain(f"cannot connect to {_name(address)}: {_reason(e)}")
            return None

    async def _handshake(self, connection: AgentConnection) -> None:
        try:
            await connection.secured().addTimeout(CONNECT_TIMEOUT, self._reactor)
        except TimeoutError:
            connection.transport.abortConnection()
            raise TimeoutError(f"no TLS handshake within {CONNECT_TIMEOUT:g} s") from None

    def emit(self, result: Result) -> None:
        self.summary.count(result.fields)
        self._out.write(result.raw + b"\n")
        self._out.flush()
        self._show_progress()

    def _show_progress(self) -> None:
        if self._progress is not None:
            self._progress.update(self.summary)

    def _complain(self, message: str) -> None:
        if self._progress is not None:
            self._progress.clear()
        self._err.write(f"agent-scheduler: {message}\n")
        self._err.flush()

    async def paced(self, requests: list[dict], pace_s: float) -> None:
        """The reference scheduler: write every line pace_s apart, then read."""
        connection = await self.connect(self._agents[0])
        if connection is None:
            self.summary.missing = len(requests)
            return
        for i, request in enumerate(requests):
            if i:
                await task.deferLater(self._reactor, pace_s, lambda: None)
            connection.send(request)
            self.summary.sent += 1
        for received in range(len(requests)):
            try:
                result = await connection.next_result(self._reactor, PACED_RESULT_DEADLINE)
            except TimeoutError:
                self._complain(f"no result within {PACED_RESULT_DEADLINE:g} s")
                result = _Closed
            if result is _Closed:
                self.summary.missing = len(requests) - received
                if connection.lost:
                    self._lost(self._agents[0], connection)
                self._complain(f"{self.summary.missing} result(s) did not arrive")
                break
            self.emit(result)
        connection.transport.loseConnection()

    async def spread(self, requests: list[dict]) -> None:
        """One task in flight per agent; busy answers go back to the queue."""
        batch = _Batch(requests)
        workers = [Deferred.fromCoroutine(self._worker(address, batch))
                   for address in self._agents]
        for worker in workers:
            await worker
        if batch.queue:
            self.summary.missing += len(batch.queue)
            self._complain(f"{len(batch.queue)} task(s) were never run: no agent could take them")

    async def _worker(self, address: tuple[str, int], batch: _Batch) -> None:
        """Feed one agent until the batch is done or the connection ends."""
        connection = await self.connect(address)
        if connection is None:
            return
        streak = 0  # busy answers in a row from this node
        while (item := await batch.take()) is not None:
            if connection.lost:  # ended between tasks: this one never left
                batch.give_back(item)
                self._lost(address, connection)
                return
            if not item.attempts:
                self.summary.sent += 1
            result, connection = await self._result_from(address, connection, item)
            if result is _Closed:
                batch.finish()
                self.summary.missing += 1  # it may have run: never resend it elsewhere
                return
            if result.fields.get("error") == BUSY_ERROR:
                item.attempts += 1
                self.summary.retried += 1
                self._show_progress()
                batch.give_back(item)  # an idle agent takes it now, this one waits
                await task.deferLater(self._reactor, backoff(streak), lambda: None)
                streak += 1
                continue
            streak = 0
            batch.finish()
            self.emit(result)
        connection.transport.loseConnection()

    async def _result_from(self, address, connection: AgentConnection, item: _Task):
        """Send the task and read its result: (Result or _Closed, the connection now).

        A connection that drops mid-task may have run the task. With an id the
        same agent is asked again: it answers a known id with that task's result
        and never runs it twice. Without one (or on another agent, which does
        not know the id) the task is never sent again.
        """
        connection.send(item.request)
        result = await connection.next_result(self._reactor)
        while result is _Closed:
            task_id = item.request.get("id")
            if not task_id or item.reconnects >= MAX_RECONNECTS:
                self._lost(address, connection, mid_task=True)
                return _Closed, connection
            self._lost(address, connection, mid_task=True,
                       then=f"; asking it again for id {task_id!r}")
            await task.deferLater(self._reactor, backoff(item.reconnects), lambda: None)
            item.reconnects += 1
            reconnected = await self.connect(address)
            if reconnected is None:
                return _Closed, connection
            connection = reconnected
            self.summary.asked_again += 1
            connection.send(item.request)
            result = await connection.next_result(self._reactor)
        return result, connection

    def _lost(self, address, connection: AgentConnection, mid_task: bool = False,
              then: str = "") -> None:
        what = connection.problem or "closed the connection"
        self._complain(f"{_name(address)} {what}{' mid-task' if mid_task else ''}{then}")


def _endpoint(reactor, host: str, port: int, tls: ClientTLS | None = None):
    """TLS over TCP when tls is given, checking the agent's certificate for host."""
    tcp = _tcp_endpoint(reactor, host, port)
    return tcp if tls is None else wrapClientTLS(tls.options_for(host), tcp)


def _tcp_endpoint(reactor, host: str, port: int):
    """A plain TCP endpoint for an IP literal: HostnameEndpoint would add 0.3 s to a refusal."""
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)
    return HostnameEndpoint(reactor, host, port, timeout=CONNECT_TIMEOUT)


def _name(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(e: Exception) -> str:
    """'Connection refused' rather than Twisted's 'Connection was refused by other side: 111: ...'."""
    if isinstance(e, ConnectError) and isinstance(e.osError, int):
        return os.strerror(e.osError)
    if isinstance(e, (SSL.Error, VerificationError)):
        return f"TLS: {tls_error_text(e)}"
    return str(e).strip().rstrip(".") or type(e).__name__


# -- command line


class Options(usage.Options):
    synopsis = ("Usage: agent-scheduler [--agent HOST:PORT]... [--pace MS] "
                "[--ca CA.pem [--cert CERT.pem --key KEY.pem]] [FILE]\n"
                "       agent-scheduler --fleet DSN [--fleet-password-file FILE] [--no-wait] "
                "[--timeout-unit s|ms] [FILE]")
    longdesc = ("Send the task requests in FILE (JSON lines or a JSON array; default stdin) "
                "to the agents, or with --fleet to the fleet's queue in PostgreSQL, print each "
                "result as a JSON line on stdout and a summary on stderr. Exit status: 0 when "
                "every task got a result (whatever it says), 1 when some did not (or, with "
                "--no-wait, were refused), 2 for bad arguments or input.")
    optFlags = [
        ["no-wait", None, "With --fleet: print each task's key (one a line) as it is queued, "
         "and return once all are, without waiting for results."],
    ]
    optParameters = [
        ["pace", None, None, "Reference mode: one connection to the first agent, "
         "a request every MS milliseconds without waiting for results.", float],
        ["ca", None, None, "Connect with TLS and accept only an agent whose certificate these "
         "CA certificates (PEM) signed for the HOST given in --agent."],
        ["cert", None, None, "Client certificate (PEM) to show an agent's mtls: door; needs --ca."],
        ["key", None, None, "Private key of --cert (PEM, unencrypted); default: the --cert file."],
        ["fleet", None, None, "Submit to the fleet instead of to agents: a PostgreSQL connection "
         "string (libpq key=value or postgresql:// URL); each task's key is its id (or one made "
         "up), a known key with the same command attaches to that task, with another is "
         "refused; waits for every result. See docs/fleet.md."],
        ["fleet-password-file", None, None, "With --fleet: a file whose first line is the "
         "database's password (else the DSN's, or PGPASSFILE's); never printed."],
        ["timeout-unit", None, None, "With --fleet: the unit of the requests' \"timeout\", s or "
         "ms (the fleet's tasks count in seconds) [default: s]."],
    ]

    def __init__(self):
        super().__init__()
        self["agents"] = []

    def opt_agent(self, value):
        """An agent to send tasks to, HOST:PORT; repeatable [default: 127.0.0.1:3000]."""
        self["agents"].append(parse_address(value))

    def parseArgs(self, file=None):
        self["file"] = file

    def postOptions(self):
        self["fleet_dsn"] = self._fleet_dsn()
        if self["fleet_dsn"] is not None:
            return
        if not self["agents"]:
            self["agents"] = [parse_address(DEFAULT_AGENT)]
        if self["pace"] is not None and not 0 <= self["pace"] < float("inf"):
            raise usage.UsageError("--pace wants a number of milliseconds, 0 or more")
        self["tls"] = self._client_tls()

    def _fleet_dsn(self) -> str | None:
        """The connection string --fleet and --fleet-password-file make; the other mode's
        options are refused with it (and its own without it)."""
        if self["fleet"] is None:
            for name in ("no-wait", "fleet-password-file", "timeout-unit"):
                if self[name]:
                    raise usage.UsageError(f"--{name} needs --fleet")
            return None
        for name in ("pace", "ca", "cert", "key"):
            if self[name] is not None:
                raise usage.UsageError(f"--{name} is for agents, not for --fleet")
        if self["agents"]:
            raise usage.UsageError("--agent and --fleet are two ways to run a batch: give one")
        if self["timeout-unit"] not in (None, *TIMEOUT_UNITS):
            raise usage.UsageError(f"--timeout-unit wants s or ms, not {self['timeout-unit']!r}")
        from agent.fleet import dsn as dsns  # psycopg: a third of the TCP modes' start-up
        try:
            dsn = dsns.with_password_file(self["fleet"], self["fleet-password-file"])
            dsns.parse(dsn)
        except OSError as e:
            raise usage.UsageError(f"--fleet-password-file: cannot read it: "
                                   f"{e.strerror or e}") from None
        except dsns.BadDsn as e:
            raise usage.UsageError(str(e)) from None
        return dsn

    def _client_tls(self) -> ClientTLS | None:
        if self["key"] and not self["cert"]:
            raise usage.UsageError("--key goes with --cert")
        if self["cert"] and not self["ca"]:
            raise usage.UsageError("--cert needs --ca: the CA that signed the agent's certificate")
        if not self["ca"]:
            return None
        try:
            return ClientTLS.from_files(self["ca"], self["cert"], self["key"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


async def _run(reactor, options: Options) -> None:
    if options["fleet_dsn"] is not None:
        from agent.clients import fleet_submit  # as dsns above: only --fleet needs psycopg
        await fleet_submit.run_batch(reactor, options["fleet_dsn"], options["file"],
                                     wait=not options["no-wait"],
                                     timeout_scale=TIMEOUT_UNITS[options["timeout-unit"] or "s"])
        return
    try:
        requests = parse_requests(read_input(options["file"]))
    except InputError as e:
        sys.stderr.write(f"agent-scheduler: {e}\n")
        raise SystemExit(2)
    progress = Progress(sys.stderr, len(requests), reactor)
    scheduler = Scheduler(reactor, options["agents"], tls=options["tls"], progress=progress)
    if options["pace"] is not None:
        await scheduler.paced(requests, options["pace"] / 1000.0)
    else:
        await scheduler.spread(requests)
    progress.clear()
    sys.stderr.write(scheduler.summary_line() + "\n")
    if scheduler.summary.missing:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(f"agent-scheduler: {e}\n{options}")
        raise SystemExit(2)
    task.react(lambda reactor: _run(reactor, options))


if __name__ == "__main__":
    main()
