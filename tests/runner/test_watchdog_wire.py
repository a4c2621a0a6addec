"""The watchdog's lines: every message survives the pipe, and a bad line is a clear error."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.runner import watchdog_wire as wire

PGIDS = st.integers(min_value=2, max_value=2**22)
MESSAGES = st.one_of(
    st.builds(wire.Watch, PGIDS, st.booleans()),
    st.builds(wire.Forget, PGIDS),
    st.builds(wire.Lease, st.floats(min_value=0, max_value=1e9)),
    st.just(wire.NoLease()),
    st.just(wire.Bye()),
)


def test_each_message_is_one_short_line():
    assert wire.encode(wire.Watch(4242)) == b"watch 4242\n"
    assert wire.encode(wire.Watch(4242, fenced=True)) == b"watch 4242 fenced\n"
    assert wire.encode(wire.Forget(4242)) == b"forget 4242\n"
    assert wire.encode(wire.Lease(2.5)) == b"lease 2.5\n"
    assert wire.encode(wire.NoLease()) == b"no-lease\n"
    assert wire.encode(wire.Bye()) == b"bye\n"


@given(MESSAGES)
def test_every_message_reads_back_as_itself(message):
    line = wire.encode(message)
    assert line.endswith(b"\n") and b"\n" not in line[:-1]
    assert len(line) <= wire.MAX_LINE
    assert wire.parse(line[:-1]) == message


def test_reports_read_back_as_themselves():
    assert wire.parse_report(wire.encode(wire.Fenced((12, 34)))[:-1]) == wire.Fenced((12, 34))
    trouble = wire.Trouble("not a watchdog message: b'x'")
    assert wire.parse_report(wire.encode(trouble)[:-1]) == trouble


def test_a_report_of_trouble_stays_one_line():
    line = wire.encode(wire.Trouble("two\nlines" + "x" * 10_000))
    assert line.count(b"\n") == 1 and len(line) <= wire.MAX_LINE


@pytest.mark.parametrize("line, says", [
    (b"watch 0", "not a task's process group: 0"),  # killpg(0) is the watchdog's own group
    (b"watch 1", "not a task's process group: 1"),
    (b"watch -7", "not a process group: '-7'"),
    (b"watch seven", "not a process group: 'seven'"),
    (b"watch 7 unfenced", "not a watchdog message"),
    (b"forget", "not a watchdog message"),
    (b"lease -1", "not a lease length in seconds: -1.0"),
    (b"lease nan", "not a lease length in seconds: nan"),
    (b"lease inf", "not a lease length in seconds: inf"),
    (b"lease soon", "not a number of seconds: 'soon'"),
    (b"kill 7", "not a watchdog message: b'kill 7'"),
    (b"", "not a watchdog message"),
    ("watch \u0667".encode(), "not ASCII"),
    (b"watch " + b"7" * 5000, "over 4096"),
])
def test_a_bad_line_says_what_is_wrong(line, says):
    with pytest.raises(wire.BadMessage) as raised:
        wire.parse(line)
    assert says in str(raised.value)


@pytest.mark.parametrize("line", [b"fenced", b"fenced x", b"fenced 1", b"hello"])
def test_a_bad_report_is_an_error(line):
    with pytest.raises(wire.BadMessage):
        wire.parse_report(line)


@pytest.mark.parametrize("pgid", [0, 1, -5, True, 2.0, "12"])
def test_the_agent_side_refuses_a_group_it_must_never_kill(pgid):
    with pytest.raises(wire.BadMessage):
        wire.checked_pgid(pgid)


@pytest.mark.parametrize("seconds", [-0.1, float("nan"), float("inf"), True, "5"])
def test_the_agent_side_refuses_a_lease_that_is_no_length(seconds):
    with pytest.raises(wire.BadMessage):
        wire.checked_seconds(seconds)
