"""Property: whatever bytes arrive, in whatever packets, every request line gets
exactly one result line, the door never raises, and the connection stays usable.
(Lines that look like HTTP close the connection: tests/doors/tcp/test_protocol.py.)"""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport

from agent.core.lanes import Lane
from agent.doors.tcp.wire import looks_like_http
from agent.doors.tcp.protocol import TaskLineFactory
from tests.fakes import FakeHost, exit_with

MAX_LINE = 256

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children,
                                                                      max_size=4),
    max_leaves=8,
)
requestish = st.fixed_dictionaries(
    {},
    optional={"command": json_values | st.lists(st.text(max_size=6), max_size=4),
              "timeout": json_values, "id": json_values | st.text(max_size=6)},
)
line_bodies = st.one_of(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")).filter(lambda b: not looks_like_http(b)),
    json_values.map(lambda v: json.dumps(v).encode()),
    requestish.map(lambda v: json.dumps(v).encode()),
    st.integers(MAX_LINE + 1, MAX_LINE * 3).map(lambda n: b"x" * n),
)


def _blank(line: bytes) -> bool:
    return not line.strip()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies=st.lists(line_bodies, min_size=1, max_size=12), cuts=st.lists(st.integers(0, 4000)),
       crlf=st.booleans())
def test_one_result_per_line_whatever_arrives(bodies, cuts, crlf):
    host = FakeHost()
    clock, spawn, engine = host.clock, host.spawn, host.engine
    factory = TaskLineFactory(engine, Lane(0), "s", max_line=MAX_LINE, clock=clock)
    proto, transport = factory.buildProtocol(None), StringTransport()
    proto.makeConnection(transport)

    ending = b"\r\n" if crlf else b"\n"
    stream = b"".join(body + ending for body in bodies)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for start, end in zip(points, points[1:]):
        proto.dataReceived(stream[start:end])
    for _, runner in list(spawn.spawned):
        exit_with(runner, 0)

    expected = sum(1 for body in bodies if not _blank(body) or len(body) > MAX_LINE)
    results = [json.loads(line) for line in transport.value().split(b"\n") if line.strip()]
    assert len(results) == expected
    assert all(isinstance(r["exit_code"], int) and "error" in r for r in results)
    assert not transport.disconnecting

    # and the connection still works afterwards
    before = len(spawn.spawned)
    proto.dataReceived(b'{"command": ["true"], "id": "after"}\n')
    exit_with(spawn.spawned[before][1], 0)
    last = json.loads(transport.value().split(b"\n")[-2])
    assert last["id"] == "after" and last["exit_code"] == 0
