"""agent-scheduler against in-process fake agents: input formats, pace mode, spreading and retries."""
from __future__ import annotations

import io
import json
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

from agent.messages import BUSY_ERROR
from agent.scheduler import InputError, Scheduler, parse_requests


def test_json_lines_are_the_reference_format():
    text = '{"command": ["a"]}\n\n{"command": ["b"], "timeout": 5}\n'
    assert parse_requests(text) == [{"command": ["a"]}, {"command": ["b"], "timeout": 5}]


def test_a_json_array_is_accepted_too():
    assert parse_requests(' [{"command": ["a"]}, {"command": ["b"]}]') == [
        {"command": ["a"]}, {"command": ["b"]}]


@pytest.mark.parametrize("text, message", [
    ('{"command": ["a"]}\n{oops\n', "line 2 is not valid JSON"),
    ('{"command": ["a"]}\n[1]\n', "line 2 is not a JSON object"),
    ('[{"command": ["a"]}, 3]', "element 2 is not a JSON object"),
    ('[{"command": ', "not a valid JSON array"),
])
def test_bad_input_names_the_line(text, message):
    with pytest.raises(InputError, match=message):
        parse_requests(text)


class FakeAgent(LineReceiver):
    """Answers each request after `delay`; answers busy while `busy_left` lasts."""

    delimiter = b"\n"

    def lineReceived(self, line):
        request = json.loads(line)
        server = self.factory
        server.received.append((time.monotonic(), request))
        if server.busy_left > 0:
            server.busy_left -= 1
            self._answer({"command": request["command"], "exit_code": -1, "error": BUSY_ERROR})
            return
        server.ran.append(request["command"])
        result = {"command": request["command"], "executed_at": 1, "duration_ms": 1.0,
                  "exit_code": 0, "output": "ok\n", "error": ""}
        reactor.callLater(server.delay, self._answer, result)

    def _answer(self, result):
        if self.transport.connected:
            self.transport.write(b"  " + json.dumps(result).encode() + b"\n")


async def _fake_agent(delay=0.0, busy=0):
    factory = Factory.forProtocol(FakeAgent)
    factory.received, factory.ran, factory.delay, factory.busy_left = [], [], delay, busy
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    factory.address = ("127.0.0.1", port.getHost().port)
    factory.port = port
    return factory


def _requests(n):
    return [{"command": ["task", str(i)]} for i in range(n)]


@pytest_twisted.ensureDeferred
async def test_paced_mode_sends_everything_on_one_connection_without_waiting():
    agent = await _fake_agent(delay=0.5)
    out = io.StringIO()
    scheduler = Scheduler(reactor, [agent.address], out=out, err=io.StringIO())
    await scheduler.paced(_requests(4), pace_s=0.02)
    await agent.port.stopListening()
    times = [t for t, _ in agent.received]
    assert times[-1] - times[0] < 0.4, "requests must not wait for results"
    assert len(out.getvalue().splitlines()) == 4
    assert scheduler.summary.ok == 4 and scheduler.summary.missing == 0


@pytest_twisted.ensureDeferred
async def test_spread_retries_busy_answers_and_runs_each_task_once():
    first, second = await _fake_agent(delay=0.05, busy=2), await _fake_agent(delay=0.05, busy=1)
    out = io.StringIO()
    scheduler = Scheduler(reactor, [first.address, second.address], out=out, err=io.StringIO())
    await scheduler.spread(_requests(10))
    for agent in (first, second):
        await agent.port.stopListening()
    ran = sorted(tuple(c) for c in first.ran + second.ran)
    assert ran == sorted(tuple(r["command"]) for r in _requests(10))
    assert first.ran and second.ran, "work is spread over both agents"
    printed = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(printed) == 10 and all(r["exit_code"] == 0 for r in printed)


@pytest_twisted.ensureDeferred
async def test_unreachable_agent_is_reported_and_counts_as_missing():
    agent = await _fake_agent()
    address = agent.address
    await agent.port.stopListening()
    err = io.StringIO()
    scheduler = Scheduler(reactor, [address], out=io.StringIO(), err=err)
    await scheduler.spread(_requests(3))
    assert scheduler.summary.missing == 3
    assert f"cannot connect to 127.0.0.1:{address[1]}" in err.getvalue()
    assert "refused" in err.getvalue()
