"""GET /tasks/{id}/output: snapshots, offsets, live following, server-sent events, back-pressure.

Following a live task and a client's pace use a real port and real processes; output already
in the spool is read through the in-memory API (tests/doors/http/memory.py)."""
from __future__ import annotations

import json
import socket
import sys

import pytest_twisted
import treq
from twisted.internet.defer import gatherResults

from agent.history.spool import TaskOutput, StreamReader
from agent.doors.http.output import OutputStreamer, ServerSentEvents
from tests.doors.http.memory import make_memory_api, memory_api  # noqa: F401
from tests.webapi import TOKEN, api, eventually, make_api, sleep  # noqa: F401

PY = sys.executable


def gated(before: str, after: str, gate) -> list[str]:
    """argv printing `before`, waiting until the file gate exists, then printing `after`."""
    return [PY, "-u", "-c",
            "import os, sys, time\n"
            f"sys.stdout.write({before!r})\n"
            f"while not os.path.exists({str(gate)!r}): time.sleep(0.01)\n"
            f"sys.stdout.write({after!r})\n"]


async def follow(api, task_id: str, query: str = "", headers=None):
    """(chunks list filling as they arrive, Deferred firing when the response ends)."""
    response = await api.request("GET", f"/tasks/{task_id}/output?follow=true{query}",
                                 headers=headers, unbuffered=True)
    assert response.code == 200
    chunks: list[bytes] = []
    return response, chunks, treq.collect(response, chunks.append)


@pytest_twisted.ensureDeferred
async def test_follow_delivers_each_chunk_before_the_task_ends(api, tmp_path):
    gate = tmp_path / "go"
    argv = gated("first\n", "second\n", gate)
    record = await api.start(argv[0], *argv[1:])
    response, chunks, done = await follow(api, record["id"])
    await eventually(lambda: _value(b"".join(chunks)), lambda got: got == b"first\n")
    assert not done.called
    assert (await api.json("GET", f"/tasks/{record['id']}"))["state"] == "running"
    gate.touch()
    await done
    assert b"".join(chunks) == b"first\nsecond\n"


@pytest_twisted.ensureDeferred
async def test_many_followers_each_get_everything(api, tmp_path):
    gate = tmp_path / "go"
    argv = gated("a" * 100_000, "z\n", gate)
    record = await api.start(argv[0], *argv[1:])
    followers = [await follow(api, record["id"]) for _ in range(4)]
    gate.touch()
    await gatherResults([done for _, _, done in followers])
    for _, chunks, _ in followers:
        assert b"".join(chunks) == b"a" * 100_000 + b"z\n"


@pytest_twisted.ensureDeferred
async def test_a_late_follower_sees_everything_and_offset_skips_ahead(api, tmp_path):
    gate = tmp_path / "go"
    argv = gated("0123456789", "!", gate)
    record = await api.start(argv[0], *argv[1:])
    await eventually(lambda: api.json("GET", f"/tasks/{record['id']}"),
                     lambda r: r["stdout_bytes"] == 10)
    _, everything, all_done = await follow(api, record["id"])
    _, tail, tail_done = await follow(api, record["id"], "&offset=7")
    gate.touch()
    await gatherResults([all_done, tail_done])
    assert b"".join(everything) == b"0123456789!"
    assert b"".join(tail) == b"789!"


@pytest_twisted.ensureDeferred
async def test_a_follow_resumes_each_stream_exactly_where_it_was_left(api, tmp_path):
    gate = tmp_path / "go"
    record = await api.start("sh", "-c", f"printf abcdef; printf 123 >&2; "
                                         f"while [ ! -e {gate} ]; do sleep 0.01; done; "
                                         f"printf gh; printf 45 >&2")
    await eventually(lambda: api.json("GET", f"/tasks/{record['id']}"),
                     lambda r: (r["stdout_bytes"], r["stderr_bytes"]) == (6, 3))
    response, chunks, done = await follow(api, record["id"],
                                          "&stream=both&stdout_offset=4&stderr_offset=1")
    assert response.headers.getRawHeaders("X-Stdout-Offset") == ["4"]
    assert response.headers.getRawHeaders("X-Stderr-Offset") == ["1"]
    gate.touch()
    await done
    assert sorted(b"".join(chunks)) == sorted(b"ef" + b"23" + b"gh" + b"45")


@pytest_twisted.ensureDeferred
async def test_event_stream_carries_chunks_by_stream_and_ends_with_the_state(api, tmp_path):
    gate = tmp_path / "go"
    record = await api.start("sh", "-c", f"echo out; echo err >&2; "
                                         f"while [ ! -e {gate} ]; do sleep 0.01; done; exit 4")
    response, chunks, done = await follow(api, record["id"], "&stream=both",
                                          headers={"Accept": "text/event-stream"})
    assert response.headers.getRawHeaders("Content-Type") == ["text/event-stream"]
    await eventually(lambda: _value(b"".join(chunks)), lambda got: got.count(b"event:") == 2)
    gate.touch()
    await done
    events = _parse_events(b"".join(chunks).decode())
    by_name = {name: data for name, data in events}
    assert by_name["stdout"] == {"text": "out\n", "next": 4}
    assert by_name["stderr"] == {"text": "err\n", "next": 4}
    name, end = events[-1]
    assert name == "end" and end["duration_ms"] > 0
    assert {k: end[k] for k in ("state", "reason", "exit_code", "signal", "error")} == {
        "state": "failed", "reason": "exited", "exit_code": 4, "signal": None, "error": ""}


# -- in memory (tests/doors/http/memory.py): output already in the spool, no live follow

def test_an_event_source_reconnecting_with_last_event_id_misses_and_repeats_nothing(memory_api):
    record = memory_api.start("sh", "-c", "printf one; printf ONE >&2; printf two")
    memory_api.finish(record["id"], stdout=b"onetwo", stderr=b"ONE")
    events = {"Accept": "text/event-stream"}
    first = memory_api.request("GET", f"/tasks/{record['id']}/output?stream=both", headers=events)
    blocks = first.body.decode().strip().split("\n\n")
    ids = [line[4:] for block in blocks for line in block.splitlines() if line.startswith("id: ")]
    assert ids and ids[-1] == "stdout:6,stderr:3"
    again = memory_api.request("GET", f"/tasks/{record['id']}/output?stream=both",
                               headers={**events, "Last-Event-ID": ids[-1]})
    assert again.header("X-Stdout-Offset") == ["6"]
    assert [name for name, _ in _parse_events(again.body.decode())] == ["end"]


def test_the_start_offset_says_where_kept_output_really_begins(make_memory_api):
    api = make_memory_api(max_log_bytes=1000)
    record = api.start("head", "-c", "100000", "/dev/zero")
    for _ in range(10):
        api.child(record["id"]).childDataReceived(1, bytes(10_000))
    done = api.finish(record["id"])
    answer = api.request("GET", f"/tasks/{record['id']}/output?offset=10")
    start = int(answer.header("X-Stdout-Offset")[0])
    assert start == done["stdout_dropped"] > 10
    assert len(answer.body) == 100_000 - start


def test_stdout_and_stderr_are_kept_apart(memory_api):
    record = memory_api.start("sh", "-c", "echo out; echo err >&2; echo out2")
    child = memory_api.child(record["id"])
    for fd, data in [(1, b"out\n"), (2, b"err\n"), (1, b"out2\n")]:
        child.childDataReceived(fd, data)
    memory_api.finish(record["id"])
    texts = {stream: memory_api.request("GET", f"/tasks/{record['id']}/output?stream={stream}")
             .body.decode() for stream in ("stdout", "stderr", "both")}
    assert texts["stdout"] == "out\nout2\n"
    assert texts["stderr"] == "err\n"
    assert sorted(texts["both"].splitlines()) == ["err", "out", "out2"]


def test_a_snapshot_of_a_running_task_ends_at_once_with_what_there_is(memory_api):
    record = memory_api.start("slow")
    memory_api.child(record["id"]).childDataReceived(1, b"partial")
    answer = memory_api.request("GET", f"/tasks/{record['id']}/output")
    assert answer.body == b"partial"
    assert answer.header("X-Task-State") == ["running"]


def test_a_task_over_its_output_cap_is_ended_and_the_end_event_says_so(memory_api):
    record = memory_api.start("yes", max_output_bytes=100_000)
    child = memory_api.child(record["id"])
    while not child.finished:
        child.childDataReceived(1, b"y\n" * 8192)
    ended = memory_api.json("GET", f"/tasks/{record['id']}")
    assert (ended["state"], ended["reason"], ended["error"], ended["exit_code"]) == \
        ("failed", "output_cap", "output limit exceeded", -1)
    assert ended["stdout_bytes"] == 100_000
    answer = memory_api.request("GET", f"/tasks/{record['id']}/output?follow=true",
                                headers={"Accept": "text/event-stream"})
    name, end = _parse_events(answer.body.decode())[-1]
    assert (name, end["reason"], end["state"]) == ("end", "output_cap", "failed")


def test_following_an_ended_task_gives_its_output_and_ends(memory_api):
    record = memory_api.start("echo", "done")
    memory_api.finish(record["id"], stdout=b"done\n")
    answer = memory_api.request("GET", f"/tasks/{record['id']}/output?follow=true")
    assert (answer.code, answer.body) == (200, b"done\n")


def _ended(state, exit_code=-1, error="", started_at=1.0):
    from agent.history.store import TaskRecord
    return TaskRecord(id="t", source="http", command=("x",), state=state, created_at=1.0,
                      started_at=started_at, finished_at=2.0, duration_ms=1000.0,
                      exit_code=exit_code, error=error)


def test_end_event_says_why_each_kind_of_task_ended():
    from agent.doors.http.output import end_summary
    cases = [
        (_ended("succeeded", 0), ("exited", None)),
        (_ended("failed", 3), ("exited", None)),
        (_ended("failed", 137, "killed by signal 9 (SIGKILL)"), ("signalled", 9)),
        (_ended("failed", -1, "cannot start 'x': No such file", started_at=None),
         ("start_failed", None)),
        (_ended("timed_out", -1, "timeout exceeded"), ("timeout", None)),
        (_ended("cancelled", -1, "cancelled by request"), ("cancelled", None)),
        (_ended("lost", -1, "agent stopped while the task was running"), ("lost", None)),
        (_ended("failed", -1, "output limit exceeded"), ("output_cap", None)),
    ]
    for record, (reason, signal) in cases:
        summary = end_summary(record)
        assert (summary["reason"], summary["signal"]) == (reason, signal), record.state
        assert summary["duration_ms"] == 1000.0 and summary["state"] == record.state


def test_the_end_event_takes_the_recorded_reason_over_a_guess():
    from dataclasses import replace

    from agent.doors.http.output import end_summary
    record = replace(_ended("failed", 143, "killed by signal 15 (SIGTERM)"), reason="signalled",
                     signal=15)
    assert (end_summary(record)["reason"], end_summary(record)["signal"]) == ("signalled", 15)
    capped = replace(_ended("failed", -1, "output limit exceeded"), reason="output_cap")
    assert end_summary(capped)["reason"] == "output_cap"


@pytest_twisted.ensureDeferred
async def test_a_follower_that_leaves_is_forgotten(api, tmp_path):
    argv = gated("x", "y", tmp_path / "never")
    record = await api.start(argv[0], *argv[1:])
    client = _raw_follower(api, record["id"])
    live = api.store.live_output(record["id"])
    await eventually(lambda: _value(len(live._watchers)), lambda n: n == 1)
    client.close()
    await eventually(lambda: _value(len(live._watchers)), lambda n: n == 0)


@pytest_twisted.ensureDeferred
async def test_a_client_that_does_not_read_pauses_the_copy(make_api, tmp_path):
    api = make_api(max_log_bytes=64 << 20)
    size = 40 << 20
    record = await api.start(PY, "-c", "import os, sys, time\n"
                                       f"sys.stdout.buffer.write(bytes({size}))\n"
                                       "sys.stdout.flush()\n"
                                       "time.sleep(300)\n")
    client = _raw_follower(api, record["id"], receive_buffer=4096)
    try:
        await eventually(lambda: api.json("GET", f"/tasks/{record['id']}"),
                         lambda r: r["stdout_bytes"] == size)
        await sleep(0.3)
        streamer, = api.store.live_output(record["id"])._watchers
        assert streamer._paused
        assert streamer._readers[1].position < size // 2, "the agent read ahead of its client"
    finally:
        client.close()


def _raw_follower(api, task_id: str, receive_buffer: int | None = None) -> socket.socket:
    """A follower that never reads its response."""
    client = socket.socket()
    if receive_buffer:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    client.connect(("127.0.0.1", api.port.getHost().port))
    client.sendall(f"GET /tasks/{task_id}/output?follow=true HTTP/1.1\r\nHost: x\r\n"
                   f"Authorization: Bearer {TOKEN}\r\n\r\n".encode())
    return client


class _FakeRequest:
    def __init__(self, pause_after: int):
        self.written: list[bytes] = []
        self._pause_after = pause_after
        self.producer = None
        self.finished = False
        from twisted.internet.defer import Deferred
        self._finish = Deferred()

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def notifyFinish(self):
        return self._finish

    def write(self, data):
        self.written.append(data)
        if len(self.written) >= self._pause_after:
            self.producer.pauseProducing()

    def finish(self):
        self.finished = True


def test_streamer_stops_reading_while_paused_and_goes_on_when_resumed(tmp_path):
    from twisted.internet.task import Clock
    output = TaskOutput(tmp_path / "t", limit=10 << 20)
    for _ in range(10):
        output.received(1, b"x" * (64 * 1024))
    output.end()
    request = _FakeRequest(pause_after=2)
    reader = StreamReader(tmp_path / "t", 1)
    clock = Clock()
    OutputStreamer(request, {1: reader}, clock=clock).start()
    assert len(request.written) == 2 and reader.position == 2 * 64 * 1024
    clock.advance(0)
    assert len(request.written) == 2, "a paused streamer must not read on"
    request._pause_after = 100
    request.producer.resumeProducing()
    clock.advance(0)
    assert b"".join(request.written) == b"x" * (640 * 1024) and request.finished


def test_event_text_survives_a_character_split_across_chunks():
    events = ServerSentEvents()
    snowman = "☃".encode()
    first = events.chunk(1, b"a" + snowman[:1], 2)
    second = events.chunk(1, snowman[1:], 4)
    texts = [json.loads(e.decode().split("data: ")[1])["text"] for e in (first, second)]
    assert "".join(texts) == "a☃"


def test_a_character_cut_short_at_the_end_is_still_sent():
    events = ServerSentEvents()
    events.chunk(1, b"ok" + "☃".encode()[:2], 4)
    tail = events.end(None).decode()
    assert json.loads(tail.split("data: ")[1]) == {"text": "\ufffd", "next": 4}


def _parse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        fields.pop("id", None)
        events.append((fields["event"], json.loads(fields["data"])))
    return events


async def _value(value):
    return value
