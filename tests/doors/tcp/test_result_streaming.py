"""Large results, encoded in pieces and streamed: the same bytes as encoding
them whole, in order with other lines, and never more than a piece at a time."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport

from agent.doors.tcp.collector import ResultOutput
from agent.doors.tcp.collector import ESCAPE_ABOVE as STREAM_ABOVE
from agent.doors.tcp.wire import (OutputEscaper, encode_result, encode_result_escaped,
                                  encode_result_pieces, escape_output)
from agent.core.outcome import Ending, Outcome
from agent.core.lanes import Lane
from agent.doors.tcp.protocol import TaskLineFactory
from tests.doors.tcp.slow import SlowTransport
from tests.fakes import FakeHost, exit_with

RAN = Outcome(Ending.EXITED, 0, "", started_at=1700000000.5, duration_ms=3.25)

# Bytes rich in what JSON and UTF-8 make special: quotes, backslashes, control
# characters, DEL, multi-byte characters (often split between chunks) and invalid bytes.
tricky_bytes = st.lists(
    st.sampled_from([b'"', b"\\", b"\n", b"\r", b"\t", b"\x00", b"\x1f", b"\x7f", b"a", b" ",
                     "é".encode(), "€".encode(), "😀".encode(), "\u2028".encode(), b"\xff", b"\xc3",
                     b"\xe2\x82", b"\xf0\x9f"]),
    max_size=40).map(b"".join)


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


@settings(max_examples=400, deadline=None)
@given(tricky_bytes, st.lists(st.integers(0, 60), max_size=8),
       st.none() | st.text(max_size=5), st.lists(st.text(max_size=5), min_size=1, max_size=3))
def test_pieces_join_to_the_whole_line(data, cuts, request_id, command):
    whole = encode_result(command, RAN, data.decode("utf-8", "replace"), request_id)
    pieces = list(encode_result_pieces(command, RAN, _chunked(data, cuts), request_id))
    assert b"".join(pieces) == whole


@given(tricky_bytes)
def test_escaped_output_is_what_json_itself_writes(data):
    text = data.decode("utf-8", "replace")
    assert b"".join(escape_output([data])) == json.dumps(text, ensure_ascii=False)[1:-1].encode()


def test_a_task_that_never_ran_is_one_piece_without_output():
    failed = Outcome.start_failed("cannot start 'x': No such file or directory")
    assert list(encode_result_pieces(["x"], failed, [b"ignored"], "i")) == [
        encode_result(["x"], failed, None, "i")]


@settings(max_examples=300, deadline=None)
@given(tricky_bytes, st.lists(st.integers(0, 60), max_size=8), st.integers(0, 30))
def test_a_collector_keeps_what_the_result_line_needs_whatever_the_chunks(data, cuts, above):
    """Small: the text as it came. Large: escaped as it arrives, the same body as
    escaping the whole output at the end, however chunks split its characters."""
    sink = ResultOutput(escape_above=above)
    for chunk in _chunked(data, cuts):
        sink.received(1, chunk)
    text = data.decode("utf-8", "replace")
    assert sink.escaped == (len(data) > above)
    if sink.escaped:
        body = b"".join(sink.pieces())
        assert body == json.dumps(text, ensure_ascii=False)[1:-1].encode()
        assert sink.held == 0
    else:
        assert sink.text() == text


def test_an_ascii_chunk_after_half_a_character_still_goes_through_the_decoder():
    escaper = OutputEscaper()
    pieces = [escaper.escape(b"\xc3"), escaper.escape(b"ab\n"), escaper.finish()]
    assert b"".join(pieces) == json.dumps("\ufffdab\n", ensure_ascii=False)[1:-1].encode()


def test_a_collector_counts_stderr_and_keeps_none_of_it():
    sink = ResultOutput(escape_above=4)
    sink.received(2, b"warning\n")
    sink.received(1, b"ok")
    assert sink.sizes == {1: 2, 2: 8} and sink.text() == "ok" and sink.held == 2


def test_a_large_output_is_escaped_as_it_arrives_and_forgotten_as_it_is_taken():
    sink = ResultOutput(escape_above=4)
    for chunk in (b"ab", b"c\n", b"d\"e"):
        sink.received(1, chunk)
    assert sink.escaped and sink.held == len(b'abc\\nd\\"e')  # escaped already, raw gone
    taken = []
    for piece in sink.pieces():
        taken.append(piece)
        assert sink.held == len(b'abc\\nd\\"e') - len(b"".join(taken))
    assert b"".join(taken) == b'abc\\nd\\"e'
    line = b"".join(encode_result_escaped(["x"], RAN, taken, "1"))
    assert json.loads(line)["output"] == 'abc\nd"e'


def test_a_large_result_is_streamed_and_no_probe_lands_inside_it():
    host = FakeHost()
    proto = TaskLineFactory(host.engine, Lane(0), clock=host.clock).buildProtocol(None)
    transport = SlowTransport(room=STREAM_ABOVE // 2)
    proto.makeConnection(transport)
    proto.dataReceived(b'{"command": ["big"], "id": "1"}\n{"command": ["slow"], "id": "2"}\n')
    big, slow = host.spawn.protocol(0), host.spawn.protocol(1)
    chunk = b"x" * (STREAM_ABOVE // 4 + 1)
    for _ in range(4):
        big.childDataReceived(1, chunk)
    proto.readConnectionLost()  # half-close: the door probes with spaces while results are due
    exit_with(big, 0)  # the first pieces of the big line are out: the client is behind
    host.clock.advance(1.0)  # probe time, with "slow" still pending
    transport.read_all()
    exit_with(slow, 0)
    first, second = transport.read_all().split(b"\n")[:2]
    assert (json.loads(first)["id"], json.loads(first)["output"]) == ("1", chunk.decode() * 4)
    assert json.loads(second)["id"] == "2"


@pytest.mark.parametrize("control", [0x00, 0x01, 0x0b, 0x1b, 0x1f])
@pytest.mark.parametrize("size", [100, 1 << 14, 1 << 20])
def test_a_control_character_anywhere_in_a_chunk_of_any_size_gets_its_u_escape(control, size):
    """Large chunks are searched byte by byte (memchr), small ones through translate:
    both find a control character at the start, in the middle and at the end."""
    line = b"printable text, a tab\t and a newline\n"
    base = (line * (size // len(line) + 1))[:size]
    for where in (0, size // 2, size - 1):
        data = base[:where] + bytes([control]) + base[where + 1:]
        assert OutputEscaper().escape(data) == \
            json.dumps(data.decode(), ensure_ascii=False)[1:-1].encode()
