"""The Backlog: what waits for slow clients stays under the bound in total,
by moving the queues of the clients behind the longest into files, and the
clients still get every byte, in order."""
from __future__ import annotations

import os

from twisted.internet.defer import Deferred, maybeDeferred

from agent.doors.tcp.backlog import Backlog, Spill
from agent.doors.tcp.linewriter import Line, LineWriter
from tests.doors.tcp.slow import SlowTransport


def at_once(f, *args):
    return maybeDeferred(f, *args)


def result(n: int, size: int) -> Line:
    """A line like a result whose output (size bytes) is held in memory until encoded."""
    chunks = [bytes([65 + n]) * 100 for _ in range(size // 100)]
    return Line.encoded(bracketed, chunks, size)


def bracketed(chunks):
    yield b"<"
    yield from chunks
    yield b">\n"


def connect(backlog, room=0):
    transport = SlowTransport(room=room)
    return LineWriter(transport, backlog), transport


def expected(n: int, size: int) -> bytes:
    return b"<" + bytes([65 + n]) * size + b">\n"


def test_under_the_bound_results_stay_in_memory(tmp_path):
    backlog = Backlog(10_000, Spill(str(tmp_path), at_once))
    writer, transport = connect(backlog)
    writer.queue(result(0, 5000))
    assert backlog.held == 5000 == writer.held, "the transport took only the '<'"


def test_past_the_bound_the_client_behind_longest_is_spilled_first(tmp_path):
    backlog = Backlog(10_000, Spill(str(tmp_path), at_once))
    first, first_transport = connect(backlog)
    second, second_transport = connect(backlog)
    first.queue(result(0, 6000))
    second.queue(result(1, 3000))
    assert backlog.held == 9000
    first.queue(result(2, 6000))
    assert first.held == 0 and second.held == 3000
    assert backlog.held == 3000
    assert first_transport.read_all() == b"<" + expected(0, 6000)[1:] + expected(2, 6000)
    assert second_transport.read_all() == expected(1, 3000)
    assert backlog.held == 0


def test_a_client_that_keeps_up_is_not_spilled(tmp_path):
    backlog = Backlog(1000, Spill(str(tmp_path), at_once))
    writer, transport = connect(backlog, room=1 << 20)
    writer.queue(result(0, 5000))
    assert not writer.paused and writer.held == 0
    assert transport.value() == expected(0, 5000)


def test_with_no_bound_nothing_is_spilled(tmp_path):
    backlog = Backlog(0, Spill(str(tmp_path), at_once))
    writer, transport = connect(backlog)
    writer.queue(result(0, 50_000))
    assert writer.held == 50_000


def test_when_the_disk_refuses_the_results_stay_in_memory_and_are_delivered(tmp_path):
    backlog = Backlog(1000, Spill(str(tmp_path / "missing"), at_once))
    writer, transport = connect(backlog)
    writer.queue(result(0, 5000))
    assert writer.held == 5000
    assert transport.read_all() == expected(0, 5000)
    assert backlog.held == 0


def test_results_keep_coming_in_order_while_a_spill_is_under_way(tmp_path):
    done = []

    def later(f, *args):
        d = Deferred()
        done.append(lambda: d.callback(f(*args)))
        return d

    backlog = Backlog(1000, Spill(str(tmp_path), later))
    writer, transport = connect(backlog)
    writer.queue(result(0, 5000))
    writer.queue(result(1, 300))
    transport.read()
    assert transport.value() == b"", "the spilling line waits for its file"
    done.pop()()
    writer.queue(result(2, 300))
    assert transport.read_all() == expected(0, 5000) + expected(1, 300) + expected(2, 300)


def test_a_client_gone_during_a_spill_leaves_no_file_and_no_count(tmp_path):
    done = []

    def later(f, *args):
        d = Deferred()
        done.append(lambda: d.callback(f(*args)))
        return d

    backlog = Backlog(1000, Spill(str(tmp_path), later))
    writer, transport = connect(backlog)
    writer.queue(result(0, 5000))
    writer.stopProducing()
    done.pop()()
    assert backlog.held == 0 and backlog.leaving == 0
    assert os.listdir(tmp_path) == []
    assert not _open_files_under(tmp_path)


def _open_files_under(path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(path)):
            found.append(target)
    return found
