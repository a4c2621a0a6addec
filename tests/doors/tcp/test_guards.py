"""Clients that stall or flood: a partial line left too long, more connections
than --max-connections, results never taken. Driven by a Clock, no sleeping."""
from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.internet import error
from twisted.trial.unittest import SynchronousTestCase

from agent.core.lanes import Lane
from agent.doors.tcp.protocol import TaskLineFactory
from tests.doors.tcp.slow import SlowTransport
from tests.fakes import FakeHost, exit_with


def lines(transport) -> list[dict]:
    return [json.loads(line) for line in transport.value().split(b"\n") if line.strip()]


class LineTimeoutTests(SynchronousTestCase):
    def setUp(self):
        self.host = FakeHost()
        self.factory = TaskLineFactory(self.host.engine, Lane(0), clock=self.host.clock,
                                       line_timeout=30)
        self.proto, self.transport = self.connect()

    def connect(self, transport=None):
        proto = self.factory.buildProtocol(None)
        transport = transport or StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_a_partial_line_left_for_the_timeout_gets_an_error_and_the_close(self):
        self.proto.dataReceived(b'{"command": ["tr')
        self.host.clock.advance(29.9)
        self.assertFalse(self.transport.disconnecting)
        self.host.clock.advance(0.1)
        [line] = lines(self.transport)
        self.assertEqual((line["command"], line["exit_code"]), (None, -1))
        self.assertIn("--line-timeout", line["error"])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.host.spawn.spawned, [])

    def test_each_new_byte_of_the_line_restarts_the_wait(self):
        for byte in b'{"command": ["true"]':
            self.proto.dataReceived(bytes([byte]))
            self.host.clock.advance(20)
        self.proto.dataReceived(b"}\n")
        self.host.clock.advance(3600)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(len(self.host.spawn.spawned), 1)

    def test_a_connection_waiting_for_a_long_task_with_no_partial_line_stays(self):
        self.proto.dataReceived(b'{"command": ["sleep"], "id": "long"}\n')
        self.host.clock.advance(6 * 3600)
        self.assertFalse(self.transport.disconnecting)
        exit_with(self.host.spawn.protocol(), 0)
        self.assertEqual(lines(self.transport)[0]["id"], "long")

    def test_a_stalled_line_ends_the_connections_pending_tasks(self):
        self.proto.dataReceived(b'{"command": ["sleep"]}\n{"comm')
        self.host.clock.advance(30)
        self.assertIn((self.host.spawn.protocol().pid, 9), self.host.kills.calls)
        self.assertEqual(self.host.engine.live, {})

    def test_no_timer_is_left_once_the_connection_is_gone(self):
        self.proto.dataReceived(b'{"comm')
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.host.clock.getDelayedCalls(), [])

    def test_zero_means_no_timeout(self):
        self.factory.line_timeout = 0
        proto, transport = self.connect()
        proto.dataReceived(b'{"comm')
        self.assertEqual(self.host.clock.getDelayedCalls(), [])

    def test_the_wait_stops_while_the_agent_itself_does_not_read(self):
        proto, transport = self.connect(SlowTransport(room=0))
        proto.dataReceived(b'{"command": ["a"]}\n{"command": ["b"]}\n')
        exit_with(self.host.spawn.protocol(0))
        exit_with(self.host.spawn.protocol(1))
        self.assertEqual(transport.producerState, "paused")
        proto.dataReceived(b'{"comm')  # already in the agent's socket buffer
        self.host.clock.advance(3600)
        self.assertFalse(transport.disconnecting)
        transport.read_all()
        self.assertEqual(transport.producerState, "producing")
        self.host.clock.advance(30)
        self.assertTrue(transport.disconnecting)


class ConnectionCapTests(SynchronousTestCase):
    def setUp(self):
        self.host = FakeHost()
        self.factory = TaskLineFactory(self.host.engine, Lane(0), clock=self.host.clock,
                                       max_connections=2)

    def connect(self, address=None):
        proto = self.factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        proto.makeConnection(transport)
        return proto, transport

    def test_past_the_cap_a_connection_gets_one_error_line_and_the_close(self):
        self.connect(), self.connect()
        proto, transport = self.connect()
        proto.dataReceived(b'{"command": ["true"]}\n')
        self.assertEqual(lines(transport), [{"command": None, "exit_code": -1,
                                             "error": "too many connections (--max-connections 2)"}])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.host.spawn.spawned, [])

    def test_a_closed_connection_makes_room(self):
        (first, _), _ = self.connect(), self.connect()
        first.connectionLost(Failure(error.ConnectionDone()))
        proto, transport = self.connect()
        proto.dataReceived(b'{"command": ["true"]}\n')
        self.assertEqual(len(self.host.spawn.spawned), 1)

    def test_refused_connections_do_not_count(self):
        self.connect(), self.connect()
        for _ in range(3):
            refused, transport = self.connect()
            refused.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.factory.connections.open, 2)

    def test_protected_mode_refusals_do_not_count(self):
        for _ in range(5):
            self.connect(IPv4Address("TCP", "192.0.2.7", 40000))
        self.connect(), self.connect()
        self.assertEqual(self.factory.connections.open, 2)

    def test_zero_means_no_cap(self):
        self.factory = TaskLineFactory(self.host.engine, Lane(0), clock=self.host.clock,
                                       max_connections=0)
        for _ in range(50):
            proto, transport = self.connect()
        self.assertFalse(transport.disconnecting)


class SlowReaderTests(SynchronousTestCase):
    """A client that does not take its results: its new requests wait, the slot does not."""

    def setUp(self):
        self.host = FakeHost()
        self.lane = Lane(1)
        self.factory = TaskLineFactory(self.host.engine, self.lane, clock=self.host.clock)
        self.proto = self.factory.buildProtocol(None)
        self.transport = SlowTransport(room=0)
        self.proto.makeConnection(self.transport)

    def finish(self, request: bytes, output: bytes = b"out\n"):
        self.proto.dataReceived(request)
        runner = self.host.spawn.protocol()
        runner.childDataReceived(1, output)
        exit_with(runner, 0)

    def test_the_agent_stops_reading_while_a_whole_result_waits_and_resumes_once_taken(self):
        self.finish(b'{"command": ["a"], "id": "1"}\n')
        self.assertEqual(self.transport.producerState, "producing", "one result in transit")
        self.finish(b'{"command": ["b"], "id": "2"}\n')
        self.assertEqual(self.transport.producerState, "paused")
        received = self.transport.read_all()
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual([json.loads(l)["id"] for l in received.split(b"\n") if l], ["1", "2"])

    def test_the_slot_is_free_as_soon_as_the_task_ends_taken_or_not(self):
        self.finish(b'{"command": ["a"]}\n', b"x" * 1_000_000)
        self.assertEqual(self.lane.running, 0)

    def test_a_client_gone_with_results_waiting_leaves_nothing_held(self):
        backlog = self.factory.backlog = _Counter()
        proto = self.factory.buildProtocol(None)
        transport = SlowTransport(room=0)
        proto.makeConnection(transport)
        proto.dataReceived(b'{"command": ["a"]}\n')
        runner = self.host.spawn.protocol()
        runner.childDataReceived(1, b"x" * 1_000_000)
        exit_with(runner, 0)
        self.assertGreater(backlog.held, 900_000)
        proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(backlog.held, 0)


class _Counter:
    def __init__(self):
        self.held = 0

    def add(self, delta, relieve=True):
        self.held += delta

    def paused(self, writer):
        pass

    def resumed(self, writer):
        pass
