"""agent-scheduler against in-process fake agents, and the examples/cmd stand-in.

The fake agent speaks the TCP protocol as the spec describes it (one result
line per request, completion order, busy answers at once, keep-alive spaces
before a result) so these tests do not depend on the real agent.
"""
from __future__ import annotations

import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.testing import StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.protocols.basic import LineReceiver
from twisted.python import usage

from agent.clients import scheduler as scheduler_module
from agent.clients.scheduler import (AgentConnection, InputError, Options, Result, Scheduler, Summary,
                             _Batch, _Closed, backoff, parse_address, parse_requests, read_input)

REPO = Path(__file__).resolve().parents[2]
CMD = REPO / "examples" / "cmd"
BUSY = "cannot allow concurrent executions"
ENV = dict(os.environ, PYTHONPATH=str(REPO))


# -- input, addresses, options, summary


def test_json_lines_are_the_reference_format():
    text = '{"command": ["a"]}\n\n  \n{"command": ["b"], "timeout": 5}\n'
    assert parse_requests(text) == [{"command": ["a"]}, {"command": ["b"], "timeout": 5}]


def test_the_reference_input_file_parses_to_four_requests():
    requests = parse_requests((REPO / "examples" / "input.json").read_text())
    assert [r["timeout"] for r in requests] == [1000, 100, 100, 50]
    assert requests[3]["command"] == ["./cmd", "-w", "200"]


def test_a_json_array_is_accepted_too():
    assert parse_requests(' \n[{"command": ["a"]},\n {"command": ["b"]}]\n') == [
        {"command": ["a"]}, {"command": ["b"]}]


def test_empty_input_is_an_empty_batch():
    assert parse_requests("") == [] == parse_requests("\n\n")


@pytest.mark.parametrize("text, message", [
    ('{"command": ["a"]}\n{oops\n', "line 2 is not valid JSON"),
    ('{"command": ["a"]}\n\n\n[1]\n', "line 4 is not a JSON object"),
    ('{"command": ["a"]} {"command": ["b"]}\n', "line 1 is not valid JSON: Extra data"),
    ('[{"command": ["a"]}, 3]', "element 2 is not a JSON object"),
    ('[{"command": ', "not a valid JSON array"),
])
def test_bad_input_names_the_line(text, message):
    with pytest.raises(InputError, match=message):
        parse_requests(text)


def test_read_input_names_the_file_and_non_utf8_lines(tmp_path):
    with pytest.raises(InputError, match="cannot read .*nope: No such file or directory"):
        read_input(str(tmp_path / "nope"))
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"command": ["a"]}\n{"command": ["\xff"]}\n')
    with pytest.raises(InputError, match="line 2 is not UTF-8"):
        read_input(str(bad))
    bom = tmp_path / "bom.json"
    bom.write_bytes(b'\xef\xbb\xbf{"command": ["a"]}\n')
    assert parse_requests(read_input(str(bom))) == [{"command": ["a"]}]


@pytest.mark.parametrize("text, address", [
    ("127.0.0.1:3000", ("127.0.0.1", 3000)),
    ("agent-7.example:3001", ("agent-7.example", 3001)),
    ("[::1]:3000", ("::1", 3000)),
])
def test_agent_addresses(text, address):
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["3000", "host", ":3000", "host:", "host:x", "host:70000"])
def test_bad_agent_address(text):
    with pytest.raises(usage.UsageError, match="HOST:PORT"):
        parse_address(text)


def test_options_default_and_repeated_agents():
    options = Options()
    options.parseOptions([])
    assert (options["agents"], options["pace"], options["file"]) == ([("127.0.0.1", 3000)], None, None)
    options = Options()
    options.parseOptions(["--agent", "a:1", "--agent", "b:2", "--pace", "200", "in.json"])
    assert (options["agents"], options["pace"], options["file"]) == (
        [("a", 1), ("b", 2)], 200.0, "in.json")
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--pace", "-5"])


def test_backoff_grows_from_50_ms_to_one_second():
    assert [backoff(n) for n in range(7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_summary_counts_each_kind_of_result():
    summary = Summary(sent=5, missing=0)
    for result in [{"exit_code": 0, "error": ""}, {"exit_code": 3, "error": ""},
                   {"exit_code": -1, "error": "timeout exceeded"},
                   {"exit_code": -1, "error": BUSY},
                   {"command": ["./nope"], "exit_code": -1, "error": "cannot start './nope'"}]:
        summary.count(result)
    assert summary.line(0.5) == ("agent-scheduler: 5 sent, 1 ok, 2 failed, 1 timed out, "
                                 "1 busy, 0 without result, 0.50 s")
    summary.retried = 3
    assert "0 without result, 3 busy answers retried, 0.50 s" in summary.line(0.5)


# -- the connection's line handling, without a network


def _connection():
    connection = AgentConnection()
    connection.makeConnection(StringTransport())
    return connection


def _queued(connection):
    results = []
    while connection.results.pending:
        connection.results.get().addCallback(results.append)
    return results


def test_result_lines_pass_through_byte_for_byte_without_keep_alive_spaces():
    connection = _connection()
    line = '{"command": ["x"], "exit_code": 0, "output": "é\\n", "error": ""}'.encode()
    connection.dataReceived(b"   ")
    connection.dataReceived(b"\n  " + line[:10])
    connection.dataReceived(line[10:] + b"\n" + line + b"\r\n")
    results = _queued(connection)
    assert [r.raw for r in results] == [line, line]
    assert results[0].fields["output"] == "é\n"


def test_a_line_that_is_not_a_json_object_drops_the_connection():
    connection = _connection()
    connection.dataReceived(b'{"exit_code": 0}\n[1, 2]\n{"exit_code": 0}\n')
    assert len(_queued(connection)) == 1, "nothing is taken after the bad line"
    assert "not a JSON object" in connection.problem
    assert connection.transport.disconnecting


def test_an_over_long_line_drops_the_connection():
    connection = _connection()
    connection.MAX_LENGTH = 100
    connection.dataReceived(b"x" * 60)
    connection.dataReceived(b"x" * 60)
    assert "longer than 100 bytes" in connection.problem


def test_a_big_result_is_split_in_linear_time():
    """Stock LineReceiver needs ~6 s for 32 MiB arriving in 64 KiB reads."""
    connection = _connection()
    body = json.dumps({"exit_code": 0, "output": "x" * (32 << 20)}).encode()
    started = time.monotonic()
    for i in range(0, len(body), 65536):
        connection.dataReceived(body[i:i + 65536])
    connection.dataReceived(b"\n")
    elapsed = time.monotonic() - started
    [result] = _queued(connection)
    assert result.raw == body
    assert elapsed < 2.0, f"{elapsed:.2f} s"


def test_connection_lost_is_queued_after_the_results():
    connection = _connection()
    connection.dataReceived(b'{"exit_code": 0}\n')
    connection.connectionLost(None)
    assert [r if r is _Closed else type(r) for r in _queued(connection)] == [Result, _Closed]
    assert connection.lost


# -- the default mode's work queue, synchronously


def _take(batch):
    taken = []
    Deferred.fromCoroutine(batch.take()).addCallback(taken.append)
    return taken


def test_an_idle_worker_waits_for_a_task_that_may_come_back():
    batch = _Batch([{"command": ["a"]}])
    first = _take(batch)
    idle = _take(batch)
    assert first[0].request == {"command": ["a"]} and idle == []
    batch.give_back(first[0])  # the node said busy
    assert idle and idle[0] is first[0], "the idle worker got the returned task"
    batch.finish()
    assert _take(batch) == [None]


def test_workers_stop_once_nothing_is_queued_or_in_flight():
    batch = _Batch([{"command": ["a"]}])
    first = _take(batch)
    waiting = [_take(batch) for _ in range(3)]
    assert waiting == [[], [], []]
    batch.finish()
    assert waiting == [[None], [None], [None]]
    assert first[0].attempts == 0


# -- fake agents on the real reactor


class FakeNode:
    """One node: `slots` tasks at a time over all its connections, like the agent.

    Commands are ["task", NAME, MS]: the task "runs" MS milliseconds, or gets
    "timeout exceeded" after the request's timeout (in ms) when that is less.
    `busy` forces that many busy answers first; a task named in `drop_on`
    makes the node hang up instead of answering. Like the agent, a request
    whose id the node knows is answered with that task's result, not run.
    """

    def __init__(self, slots=1, busy=0, drop_on=()):
        self.slots, self.busy, self.drop_on = slots, busy, set(drop_on)
        self.running = 0
        self.received: list[tuple[int, float, dict]] = []  # (connection, time, request)
        self.ran: list[str] = []
        self.known: dict[str, dict] = {}  # id -> result
        self.connections = 0
        self.busy_answers = 0
        self.address = None
        self._port = None
        self._protocols = []

    async def start(self):
        factory = Factory.forProtocol(FakeAgentProtocol)
        factory.node = self
        self._port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.address = ("127.0.0.1", self._port.getHost().port)
        return self

    async def stop(self):
        for protocol in self._protocols:
            protocol.transport.loseConnection()
        await self._port.stopListening()


class FakeAgentProtocol(LineReceiver):
    delimiter = b"\n"

    def connectionMade(self):
        node = self.factory.node
        node.connections += 1
        node._protocols.append(self)
        self.number = node.connections

    def lineReceived(self, line):
        if not line.strip():
            return
        node, request = self.factory.node, json.loads(line)
        command = request["command"]
        node.received.append((self.number, time.monotonic(), request))
        if request.get("id") in node.known:
            self._answer({**node.known[request["id"]], "replayed": True}, request)
            return
        if node.busy > 0 or node.running >= node.slots:
            node.busy = max(node.busy - 1, 0)
            node.busy_answers += 1
            self._answer({"command": command, "exit_code": -1, "error": BUSY}, request)
            return
        name, ms = command[1], int(command[2])
        node.ran.append(name)
        if name in node.drop_on:
            if "id" in request:  # it ran; only its result was lost with the connection
                node.known[request["id"]] = {
                    "command": command, "executed_at": 1795388686, "duration_ms": float(ms),
                    "exit_code": 0, "output": f"ran {name} – ok\n", "error": ""}
            node.drop_on.discard(name)
            self.transport.loseConnection()
            return
        node.running += 1
        timeout = request.get("timeout")
        if timeout is not None and timeout < ms:
            reactor.callLater(timeout / 1000, self._finish, request, {
                "command": command, "executed_at": 1795388686, "duration_ms": float(timeout),
                "exit_code": -1, "output": "", "error": "timeout exceeded"})
        else:
            reactor.callLater(ms / 1000, self._finish, request, {
                "command": command, "executed_at": 1795388686, "duration_ms": float(ms),
                "exit_code": 0, "output": f"ran {name} – ok\n", "error": ""})

    def _finish(self, request, result):
        self.factory.node.running -= 1
        if "id" in request:
            self.factory.node.known[request["id"]] = dict(result)
        self._answer(result, request)

    def _answer(self, result, request):
        if "id" in request:
            result["id"] = request["id"]
        if self.transport.connected:
            line = json.dumps(result, ensure_ascii=False, separators=(", ", ": "))
            self.transport.write(b"  " + line.encode() + b"\n")


def _task(name, ms=0, timeout=None):
    request = {"command": ["task", name, str(ms)]}
    if timeout is not None:
        request["timeout"] = timeout
    return request


def _printed(out: io.BytesIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def _scheduler(*nodes):
    out, err = io.BytesIO(), io.StringIO()
    return Scheduler(reactor, [n.address for n in nodes], out=out, err=err), out, err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest_twisted.ensureDeferred
async def test_paced_mode_replays_the_reference_scenario():
    """input.json with a 200 ms pace: two busy answers first, then the two tasks."""
    node = await FakeNode().start()
    requests = [_task("quote0", 500, 1000), _task("quote3", 50, 100),
                _task("quote5", 50, 100), _task("wait", 200, 50)]
    scheduler, out, _ = _scheduler(node)
    await scheduler.paced(requests, pace_s=0.2)
    await node.stop()
    assert node.connections == 1
    sent_at = [t for _, t, _ in node.received]
    assert 0.55 < sent_at[-1] - sent_at[0] < 1.2, "one line every 200 ms"
    printed = _printed(out)
    assert [r["command"][1] for r in printed] == ["quote3", "quote5", "quote0", "wait"]
    assert [r["error"] for r in printed] == [BUSY, BUSY, "", "timeout exceeded"]
    assert scheduler.summary_line().startswith(
        "agent-scheduler: 4 sent, 1 ok, 0 failed, 1 timed out, 2 busy, 0 without result, ")


@pytest_twisted.ensureDeferred
async def test_paced_mode_prints_results_as_the_agent_wrote_them_in_arrival_order():
    node = await FakeNode(slots=10).start()
    scheduler, out, _ = _scheduler(node)
    await scheduler.paced([_task("slow", 300), _task("fast", 0)], pace_s=0.01)
    await node.stop()
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["command"][1] for line in lines] == ["fast", "slow"]
    assert lines[0] == ('{"command": ["task", "fast", "0"], "executed_at": 1795388686, '
                        '"duration_ms": 0.0, "exit_code": 0, "output": "ran fast – ok\\n", '
                        '"error": ""}').encode()


@pytest_twisted.ensureDeferred
async def test_paced_mode_gives_up_on_a_result_after_the_deadline(monkeypatch):
    monkeypatch.setattr(scheduler_module, "PACED_RESULT_DEADLINE", 0.3)
    node = await FakeNode(slots=10).start()
    scheduler, out, err = _scheduler(node)
    await scheduler.paced([_task("quick", 0), _task("forever", 60_000)], pace_s=0)
    await node.stop()
    assert len(_printed(out)) == 1
    assert scheduler.summary.missing == 1
    assert "no result within 0.3 s" in err.getvalue()
    assert "1 result(s) did not arrive" in err.getvalue()


@pytest_twisted.ensureDeferred
async def test_default_mode_spreads_work_and_retries_busy_answers_exactly_once():
    first, second = await FakeNode(busy=2).start(), await FakeNode(busy=1).start()
    requests = [_task(f"t{i}", 30) for i in range(12)]
    scheduler, out, err = _scheduler(first, second)
    await scheduler.spread(requests)
    await first.stop()
    await second.stop()
    assert sorted(first.ran + second.ran) == sorted(f"t{i}" for i in range(12))
    assert first.ran and second.ran, "work is spread over both agents"
    assert first.connections == second.connections == 1
    printed = _printed(out)
    assert len(printed) == 12 and all(r["exit_code"] == 0 for r in printed)
    assert scheduler.summary.retried == first.busy_answers + second.busy_answers == 3
    assert scheduler.summary.sent == 12 and scheduler.summary.missing == 0
    assert "12 sent, 12 ok, 0 failed, 0 timed out, 0 busy, 0 without result, 3 busy answers " \
           "retried" in scheduler.summary_line()
    assert err.getvalue() == ""


@pytest_twisted.ensureDeferred
async def test_a_busy_answer_goes_to_the_idle_node():
    """A node kept busy by someone else gets nothing done; the free one does it all."""
    stuck, free = await FakeNode(busy=10**6).start(), await FakeNode().start()
    scheduler, out, _ = _scheduler(stuck, free)
    started = time.monotonic()
    await scheduler.spread([_task(f"t{i}", 20) for i in range(5)])
    elapsed = time.monotonic() - started
    await stuck.stop()
    await free.stop()
    assert stuck.ran == [] and sorted(free.ran) == [f"t{i}" for i in range(5)]
    assert len(_printed(out)) == 5
    assert elapsed < 1.0, f"{elapsed:.2f} s: tasks waited for the busy node's back-off"


@pytest_twisted.ensureDeferred
async def test_one_busy_node_is_retried_with_a_growing_back_off():
    node = await FakeNode(busy=3).start()
    scheduler, out, _ = _scheduler(node)
    started = time.monotonic()
    await scheduler.spread([_task("only", 0)])
    elapsed = time.monotonic() - started
    await node.stop()
    assert node.ran == ["only"] and len(_printed(out)) == 1
    assert [t for _, t, _ in node.received][-1] - node.received[0][1] >= 0.05 + 0.1 + 0.2 - 0.01
    assert elapsed < 1.0


@pytest_twisted.ensureDeferred
async def test_a_task_whose_connection_drops_is_never_resent():
    first, second = await FakeNode(drop_on={"t0"}).start(), await FakeNode().start()
    scheduler, out, err = _scheduler(first, second)
    await scheduler.spread([_task(f"t{i}", 20) for i in range(4)])
    await first.stop()
    await second.stop()
    assert (first.ran + second.ran).count("t0") == 1
    assert sorted(r["command"][1] for r in _printed(out)) == ["t1", "t2", "t3"]
    assert scheduler.summary.missing == 1 and scheduler.summary.sent == 4
    assert f"127.0.0.1:{first.address[1]} closed the connection mid-task" in err.getvalue()


@pytest_twisted.ensureDeferred
async def test_a_task_with_an_id_is_asked_for_again_on_its_agent_and_runs_once():
    first, second = await FakeNode(drop_on={"t0"}).start(), await FakeNode().start()
    scheduler, out, err = _scheduler(first, second)
    tasks = [{**_task(f"t{i}", 20), "id": f"t{i}"} for i in range(4)]
    await scheduler.spread(tasks)
    await first.stop()
    await second.stop()
    assert (first.ran + second.ran).count("t0") == 1
    printed = {r["id"]: r for r in _printed(out)}
    assert sorted(printed) == ["t0", "t1", "t2", "t3"]
    assert printed["t0"]["replayed"] is True and printed["t0"]["exit_code"] == 0
    assert [r["id"] for _, _, r in first.received].count("t0") == 2  # asked again, same node
    assert (scheduler.summary.missing, scheduler.summary.asked_again) == (0, 1)
    assert "closed the connection mid-task; asking it again for id 't0'" in err.getvalue()
    assert "1 asked for again after a dropped connection" in scheduler.summary_line()


@pytest_twisted.ensureDeferred
async def test_connection_refused_gives_a_clear_error():
    port = _free_port()
    err = io.StringIO()
    scheduler = Scheduler(reactor, [("127.0.0.1", port)], out=io.BytesIO(), err=err)
    await scheduler.spread([_task("a"), _task("b")])
    assert f"agent-scheduler: cannot connect to 127.0.0.1:{port}: Connection refused\n" in \
        err.getvalue()
    assert scheduler.summary.missing == 2


@pytest_twisted.ensureDeferred
async def test_the_command_line_runs_a_json_array_from_stdin_against_two_agents(tmp_path):
    first, second = await FakeNode().start(), await FakeNode().start()
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps([_task(f"t{i}", 10) for i in range(6)]))
    out, err, code = await getProcessOutputAndValue(
        "/bin/sh", ["-c", f'exec "$0" -m agent.clients.scheduler --agent 127.0.0.1:{first.address[1]} '
                    f'--agent 127.0.0.1:{second.address[1]} < "$1"', sys.executable, str(batch)],
        env=ENV, path=str(REPO))
    await first.stop()
    await second.stop()
    assert code == 0, err
    assert sorted(json.loads(line)["command"][1] for line in out.splitlines()) == [
        f"t{i}" for i in range(6)]
    assert b"agent-scheduler: 6 sent, 6 ok, 0 failed, 0 timed out, 0 busy, 0 without result" in err


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "agent.clients.scheduler", *args], capture_output=True,
                          text=True, timeout=10, env=ENV, cwd=REPO, **kwargs)


def test_the_command_line_rejects_a_bad_input_line_with_status_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"command": ["true"]}\n{"command": \n')
    proc = _cli(str(bad))
    assert proc.returncode == 2
    assert proc.stderr.startswith("agent-scheduler: line 2 is not valid JSON")
    assert proc.stdout == ""


def test_the_command_line_fails_with_status_1_when_no_agent_answers():
    port = _free_port()
    proc = _cli("--agent", f"127.0.0.1:{port}", input='{"command": ["true"]}\n')
    assert proc.returncode == 1
    assert f"agent-scheduler: cannot connect to 127.0.0.1:{port}: Connection refused\n" in proc.stderr
    assert "0 sent, 0 ok, 0 failed, 0 timed out, 0 busy, 1 without result" in proc.stderr


def test_the_command_line_rejects_bad_options_with_status_2():
    proc = _cli("--agent", "nowhere")
    assert proc.returncode == 2
    assert "--agent wants HOST:PORT, not 'nowhere'" in proc.stderr
    assert "Usage: agent-scheduler" in proc.stderr


# -- examples/cmd


def _cmd(*args):
    return subprocess.run([str(CMD), *args], capture_output=True, timeout=10, cwd=CMD.parent)


def test_cmd_prints_the_chosen_quote():
    proc = _cmd("-r", "3")
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0, b"Talk is cheap. Show me the code. - Linus Torvalds\n", b"")


def test_cmd_has_nine_different_one_line_quotes():
    quotes = [_cmd("-r", str(n)).stdout for n in range(9)]
    assert len(set(quotes)) == 9
    assert all(q.endswith(b"\n") and q.count(b"\n") == 1 for q in quotes)
    assert _cmd().stdout == quotes[0]


def test_cmd_waits_the_given_milliseconds():
    started = time.monotonic()
    proc = _cmd("-w", "100", "-r", "1")
    elapsed = time.monotonic() - started
    assert proc.returncode == 0 and proc.stdout.startswith(b"Simplicity")
    assert 0.095 <= elapsed < 2.0
    started = time.monotonic()
    assert _cmd("-w", "08").returncode == 0, "a leading zero is not octal"
    assert time.monotonic() - started < 2.0


def test_cmd_exit_code_and_stderr():
    proc = _cmd("-x", "7", "-e", "something went wrong")
    assert proc.returncode == 7
    assert proc.stderr == b"something went wrong\n"
    assert proc.stdout.startswith(b"The only way")


def test_cmd_prints_exactly_the_requested_bytes():
    proc = _cmd("-b", "100000")
    assert proc.returncode == 0 and proc.stdout == b"x" * 100000


@pytest.mark.parametrize("args", [["-q"], ["-r", "9"], ["-w", "soon"], ["-x", "256"],
                                  ["-b", "-1"], ["extra"], ["-r"]])
def test_cmd_bad_flags_print_usage_and_exit_2(args):
    proc = _cmd(*args)
    assert proc.returncode == 2 and proc.stdout == b""
    assert b"usage: cmd" in proc.stderr


def test_cmd_starts_fast():
    times = []
    for _ in range(5):
        started = time.monotonic()
        assert _cmd("-r", "0").returncode == 0
        times.append(time.monotonic() - started)
    assert statistics.median(times) < 0.1, times
