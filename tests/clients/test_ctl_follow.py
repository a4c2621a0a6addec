"""Following a task's output: every byte once, resumed from the last event after a dropped
connection, with fake responses in place of the agent (no network, no sleeping)."""
from __future__ import annotations

import http.client
import json

import pytest

from agent.clients.agentapi import ClientError, Refused, Unreachable
from agent.clients.follow import OutputFollower


def chunk(stream: str, text: str, next_offset: int) -> list[bytes]:
    payload = json.dumps({"text": text, "next": next_offset})
    return [f"event: {stream}\n".encode(), f"data: {payload}\n".encode(), b"\n"]


def end(**summary) -> list[bytes]:
    summary = {"state": "succeeded", "reason": "exited", "exit_code": 0, **summary}
    return [b"event: end\n", f"data: {json.dumps(summary)}\n".encode(), b"\n"]


class FakeResponse:
    """Gives its lines, then ends as told: None a clean end of the body, else raises it."""

    def __init__(self, lines, then=None, headers=None):
        self._lines = list(lines)
        self._then = then
        self.headers = headers or {}
        self.closed = False

    def readline(self) -> bytes:
        if self._lines:
            return self._lines.pop(0)
        if self._then is not None:
            raise self._then
        return b""

    def close(self):
        self.closed = True


class FakeAgent:
    """Answers each request with the next response (or raises the next error); keeps the queries."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.queries: list[dict] = []

    def open(self, query):
        self.queries.append(query)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


class FakeTime:
    def __init__(self):
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds):
        self.slept.append(seconds)
        self.now += seconds

    def clock(self):
        return self.now


def follower(agent, streams=("stdout", "stderr"), follow=True, give_up_after=30.0):
    written, notes, time = [], [], FakeTime()
    f = OutputFollower(agent.open, lambda stream, text: written.append((stream, text)), streams,
                       follow, notes.append, give_up_after, time.sleep, time.clock)
    return f, written, notes, time


def test_a_dropped_connection_resumes_each_stream_from_the_last_event_received():
    first = FakeResponse([*chunk("stdout", "hello ", 6), *chunk("stderr", "oops", 4),
                          *chunk("stdout", "wor", 9)[:2]],  # cut inside an event
                         then=http.client.IncompleteRead(b""))
    second = FakeResponse([*chunk("stdout", "world\n", 12), *end(exit_code=3)])
    agent = FakeAgent(first, second)
    f, written, _, time = follower(agent)
    assert f.run()["exit_code"] == 3
    assert agent.queries == [
        {"stream": "both", "follow": "true", "stdout_offset": "0", "stderr_offset": "0"},
        {"stream": "both", "follow": "true", "stdout_offset": "6", "stderr_offset": "4"}]
    assert written == [("stdout", "hello "), ("stderr", "oops"), ("stdout", "world\n")]
    assert first.closed and second.closed
    assert time.slept == []  # it had made progress: straight back


def test_a_reset_connection_is_resumed_too():
    agent = FakeAgent(FakeResponse(chunk("stdout", "a", 1), then=ConnectionResetError()),
                      FakeResponse(end()))
    f, written, _, _ = follower(agent, streams=("stdout",))
    f.run()
    assert agent.queries[1] == {"stream": "stdout", "follow": "true", "stdout_offset": "1"}


def test_a_follow_that_ends_without_the_end_event_is_reopened():
    agent = FakeAgent(FakeResponse(chunk("stderr", "x", 1)), FakeResponse(end()))
    f, _, _, _ = follower(agent, streams=("stderr",))
    assert f.run()["state"] == "succeeded"
    assert agent.queries[1]["stderr_offset"] == "1"


def test_without_follow_the_end_of_the_body_is_the_end_of_the_output():
    agent = FakeAgent(FakeResponse(chunk("stdout", "so far", 6)))
    f, written, _, _ = follower(agent, streams=("stdout",), follow=False)
    assert f.run() is None
    assert agent.queries == [{"stream": "stdout", "stdout_offset": "0"}]
    assert written == [("stdout", "so far")]


def test_a_silent_follow_is_reopened_without_counting_as_a_failure():
    silent = [FakeResponse([], then=TimeoutError()) for _ in range(100)]
    agent = FakeAgent(*silent, FakeResponse(end()))
    f, _, _, time = follower(agent, give_up_after=1.0)
    assert f.run()["reason"] == "exited"
    assert time.slept == [] and len(agent.queries) == 101


def test_an_unreachable_agent_is_retried_with_backoff_then_given_up():
    agent = FakeAgent(*[Unreachable("cannot reach the agent: Connection refused")] * 100)
    f, _, _, time = follower(agent, give_up_after=5.0)
    with pytest.raises(Unreachable, match="Connection refused; gave up following after 5 s"):
        f.run()
    assert time.slept[:3] == [0.1, 0.2, 0.4] and max(time.slept) == 2.0
    assert 5.0 <= time.now < 8.0


def test_the_agent_back_within_the_limit_resumes_where_it_was():
    agent = FakeAgent(FakeResponse(chunk("stdout", "a", 1), then=ConnectionResetError()),
                      Unreachable("refused"), Unreachable("refused"),
                      FakeResponse(chunk("stdout", "b", 2) + end()))
    f, written, _, time = follower(agent, streams=("stdout",))
    f.run()
    assert written == [("stdout", "a"), ("stdout", "b")]
    assert agent.queries[-1]["stdout_offset"] == "1"
    assert len(time.slept) == 2


def test_an_error_answer_ends_the_follow_at_once():
    agent = FakeAgent(FakeResponse(chunk("stdout", "a", 1), then=ConnectionResetError()),
                      Refused(404, "no task with id 'x'"))
    f, _, _, time = follower(agent)
    with pytest.raises(Refused):
        f.run()
    assert time.slept == []


def test_the_response_offset_header_moves_a_stream_past_bytes_the_agent_dropped():
    agent = FakeAgent(FakeResponse([], then=ConnectionResetError(),
                                   headers={"X-Stdout-Offset": "5000"}),
                      FakeResponse(end()))
    f, _, _, _ = follower(agent, streams=("stdout",))
    f.run()
    assert agent.queries[1]["stdout_offset"] == "5000"


def test_dropped_bytes_are_told_to_the_operator():
    dropped = [b"event: dropped\n", b'data: {"stream": "stdout", "bytes": 4096}\n', b"\n"]
    f, _, notes, _ = follower(FakeAgent(FakeResponse(dropped + end())))
    f.run()
    assert notes == ["4096 bytes of stdout were dropped by the agent before they could be read"]


def test_an_event_that_is_not_the_agents_json_is_a_client_error_not_a_traceback():
    bad = [b"event: stdout\n", b"data: [1, 2]\n", b"\n"]
    f, _, _, _ = follower(FakeAgent(FakeResponse(bad)))
    with pytest.raises(ClientError, match="not a JSON object"):
        f.run()


def test_a_failed_write_ends_the_follow_instead_of_passing_for_a_dropped_connection():
    def broken_pipe(stream, text):
        raise BrokenPipeError(32, "Broken pipe")
    agent = FakeAgent(*[FakeResponse(chunk("stdout", "x", 1)) for _ in range(3)])
    f = OutputFollower(agent.open, broken_pipe, ("stdout",))
    with pytest.raises(BrokenPipeError):
        f.run()
    assert len(agent.queries) == 1
