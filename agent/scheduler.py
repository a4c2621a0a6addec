"""`agent-scheduler`: send task requests to one or more agents and print the results.

Two modes:
- default: each agent gets one task at a time; a task answered "cannot allow
  concurrent executions" is retried (on another agent when there is one)
  after a short back-off, so a batch finishes as fast as the nodes allow and
  every task runs exactly once;
- --pace MS: seed A's reference scheduler, exactly: one connection, a line
  every MS milliseconds without waiting, then read as many results as were
  sent, each within 10 s.
"""
from __future__ import annotations

import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredQueue, TimeoutError
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.protocols.basic import LineReceiver
from twisted.python import usage

from agent.messages import BUSY_ERROR, TIMEOUT_ERROR

DEFAULT_AGENT = "127.0.0.1:3000"
PACED_RESULT_DEADLINE = 10.0
FIRST_BACKOFF, MAX_BACKOFF = 0.05, 1.0


class InputError(ValueError):
    """The request file cannot be read as JSON lines or a JSON array."""


def parse_requests(text: str) -> list[dict]:
    """Requests as JSON lines (the reference format) or as one JSON array."""
    if text.lstrip().startswith("["):
        try:
            requests = json.loads(text)
        except ValueError as e:
            raise InputError(f"input is not a valid JSON array: {e}") from None
        numbered = list(enumerate(requests, 1))
        where = "element"
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    numbered.append((number, json.loads(line)))
                except ValueError as e:
                    raise InputError(f"line {number} is not valid JSON: {e}") from None
        where = "line"
    for number, request in numbered:
        if not isinstance(request, dict):
            raise InputError(f"{where} {number} is not a JSON object")
    return [request for _, request in numbered]


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise usage.UsageError(f"--agent wants HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


@dataclass
class Summary:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    timed_out: int = 0
    busy: int = 0
    missing: int = 0
    started: float = field(default_factory=time.monotonic)

    def count(self, result: dict) -> None:
        if result.get("error") == TIMEOUT_ERROR:
            self.timed_out += 1
        elif result.get("error") == BUSY_ERROR:
            self.busy += 1
        elif result.get("exit_code") == 0 and not result.get("error"):
            self.ok += 1
        else:
            self.failed += 1

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        return (f"agent-scheduler: {self.sent} sent, {self.ok} ok, {self.failed} failed, "
                f"{self.timed_out} timed out, {self.busy} busy, {self.missing} without result, "
                f"{elapsed:.2f} s")


class _Closed:
    """Put on the result queue when the agent closes the connection."""


class AgentConnection(LineReceiver):
    """One connection to an agent: send requests, take result lines in arrival order."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 30  # a result carries a task's whole stdout

    def __init__(self):
        self.results: DeferredQueue = DeferredQueue()

    def send(self, request: dict) -> None:
        self.transport.write(json.dumps(request).encode() + b"\n")

    def lineReceived(self, line: bytes) -> None:
        if line.strip():  # the agent may write spaces as keep-alive probes
            self.results.put(json.loads(line))

    def connectionLost(self, reason) -> None:
        self.results.put(_Closed)

    async def next_result(self, reactor, deadline: float | None = None):
        d = self.results.get()
        if deadline is not None:
            d.addTimeout(deadline, reactor)
        return await d


class Scheduler:
    def __init__(self, reactor, agents: list[tuple[str, int]], out=sys.stdout, err=sys.stderr):
        self._reactor = reactor
        self._agents = agents
        self._out = out
        self._err = err
        self.summary = Summary()

    async def connect(self, address: tuple[str, int]) -> AgentConnection | None:
        try:
            return await connectProtocol(HostnameEndpoint(self._reactor, *address, timeout=10),
                                         AgentConnection())
        except Exception as e:
            self._complain(f"cannot connect to {address[0]}:{address[1]}: {_reason(e)}")
            return None

    def emit(self, result: dict) -> None:
        self.summary.count(result)
        self._out.write(json.dumps(result) + "\n")
        self._out.flush()

    def _complain(self, message: str) -> None:
        self._err.write(f"agent-scheduler: {message}\n")

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
                result = _Closed
            if result is _Closed:
                self.summary.missing = len(requests) - received
                self._complain(f"{self.summary.missing} result(s) did not arrive")
                break
            self.emit(result)
        connection.transport.loseConnection()

    async def spread(self, requests: list[dict]) -> None:
        """One task in flight per agent; busy answers go back to the queue."""
        work = deque((request, 0) for request in requests)
        workers = [Deferred.fromCoroutine(self._worker(address, work)) for address in self._agents]
        for worker in workers:
            await worker
        self.summary.missing += len(work)
        if work:
            self._complain(f"{len(work)} task(s) were never sent: no agent could take them")

    async def _worker(self, address, work: deque) -> None:
        connection = await self.connect(address)
        if connection is None:
            return
        while work:
            request, attempts = work.popleft()
            connection.send(request)
            result = await connection.next_result(self._reactor)
            if result is _Closed:
                self.summary.missing += 1  # it may have run: never resend it
                self._complain(f"{address[0]}:{address[1]} closed the connection mid-task")
                return
            if result.get("error") == BUSY_ERROR:
                work.appendleft((request, attempts + 1))  # the next free agent takes it
                backoff = min(FIRST_BACKOFF * 2 ** attempts, MAX_BACKOFF)
                await task.deferLater(self._reactor, backoff, lambda: None)
                continue
            self.summary.sent += 1
            self.emit(result)
        connection.transport.loseConnection()


class Options(usage.Options):
    synopsis = "[--agent HOST:PORT]... [--pace MS] [FILE]"
    optParameters = [["pace", None, None, "Reference mode: one connection, a request every MS "
                      "milliseconds without waiting for results.", float]]

    def __init__(self):
        super().__init__()
        self["agents"] = []

    def opt_agent(self, value):
        """An agent to send tasks to, HOST:PORT; repeatable [default: 127.0.0.1:3000]."""
        self["agents"].append(parse_address(value))

    def parseArgs(self, file=None):
        self["file"] = file

    def postOptions(self):
        if not self["agents"]:
            self["agents"] = [parse_address(DEFAULT_AGENT)]
        if self["pace"] is not None and self["pace"] < 0:
            raise usage.UsageError("--pace must be 0 or more milliseconds")


def _read_input(path: str | None) -> str:
    if path in (None, "-"):
        return sys.stdin.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def _reason(e: Exception) -> str:
    return str(e).strip().rstrip(".") or type(e).__name__


async def _run(reactor, options: Options) -> int:
    try:
        requests = parse_requests(_read_input(options["file"]))
    except (InputError, OSError) as e:
        sys.stderr.write(f"agent-scheduler: {e}\n")
        return 2
    scheduler = Scheduler(reactor, options["agents"])
    if options["pace"] is not None:
        await scheduler.paced(requests, options["pace"] / 1000.0)
    else:
        await scheduler.spread(requests)
    sys.stderr.write(scheduler.summary.line() + "\n")
    return 1 if scheduler.summary.missing else 0


def main(argv: list[str] | None = None) -> None:
    options = Options()
    try:
        options.parseOptions(sys.argv[1:] if argv is None else argv)
    except usage.UsageError as e:
        sys.stderr.write(f"agent-scheduler: {e}\n{options}")
        raise SystemExit(2)

    def run(reactor):
        return Deferred.fromCoroutine(_run(reactor, options)).addCallback(_exit_status)

    task.react(run)


def _exit_status(code: int) -> None:
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
