"""The TCP door in memory: lines in, result lines out, over-long lines, half-close, disconnect."""
from __future__ import annotations

import json

from twisted.internet import error
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from agent.core.lanes import Lane
from agent.doors.tcp.protocol import PROBE_INTERVAL, TaskLineFactory
from tests.fakes import FakeHost, exit_with


class DoorTests(SynchronousTestCase):
    def setUp(self):
        host = FakeHost()
        self.clock, self.spawn, self.kills, self.engine = host.clock, host.spawn, host.kills, host.engine
        self.lane = Lane(1)
        self.factory = TaskLineFactory(self.engine, self.lane, "ms", max_line=100, clock=self.clock)
        self.proto, self.transport = self.connect()

    def connect(self):
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def results(self, transport=None) -> list[dict]:
        transport = transport or self.transport
        return [json.loads(line) for line in transport.value().split(b"\n") if line.strip()]

    def test_a_finished_task_gets_one_result_line(self):
        self.proto.dataReceived(b'{"command": ["echo", "hi"], "id": "1"}\n')
        runner = self.spawn.protocol()
        runner.childDataReceived(1, b"hi\n")
        exit_with(runner, 0)
        [result] = self.results()
        self.assertEqual((result["id"], result["output"], result["exit_code"]), ("1", "hi\n", 0))

    def test_crlf_and_blank_lines(self):
        self.proto.dataReceived(b'\r\n\n  \n{"command": ["true"]}\r\n')
        self.assertEqual(len(self.spawn.spawned), 1)
        self.assertEqual(self.transport.value(), b"")

    def test_requests_split_across_packets(self):
        for byte in b'{"command": ["true"]}\n':
            self.proto.dataReceived(bytes([byte]))
        self.assertEqual(len(self.spawn.spawned), 1)

    def test_timeout_is_read_in_the_configured_unit(self):
        self.proto.dataReceived(b'{"command": ["sleep"], "timeout": 250}\n')
        self.clock.advance(0.25)
        self.assertEqual(self.results()[0]["error"], "timeout exceeded")

    def test_busy_answer_is_immediate_and_echoes_command_and_id(self):
        self.proto.dataReceived(b'{"command": ["a"]}\n{"command": ["b", "x"], "id": "q"}\n')
        self.assertEqual(self.results(), [{"command": ["b", "x"], "exit_code": -1, "id": "q",
                                           "error": "cannot allow concurrent executions"}])

    def test_limit_is_shared_across_connections(self):
        self.proto.dataReceived(b'{"command": ["a"]}\n')
        other, transport = self.connect()
        other.dataReceived(b'{"command": ["b"]}\n')
        self.assertEqual(self.results(transport)[0]["error"], "cannot allow concurrent executions")

    def test_bad_line_gets_an_error_and_the_next_line_runs(self):
        self.proto.dataReceived(b'{"command": 5}\n{"command": ["true"]}\n')
        self.assertIn("must be a list of strings", self.results()[0]["error"])
        self.assertEqual(len(self.spawn.spawned), 1)

    def test_over_long_complete_line_is_answered_and_skipped(self):
        self.proto.dataReceived(b"x" * 500 + b'\n{"command": ["true"]}\n')
        self.assertIn("longer than 100 bytes", self.results()[0]["error"])
        self.assertEqual(len(self.spawn.spawned), 1)
        self.assertFalse(self.transport.disconnecting)

    def test_over_long_line_arriving_in_pieces_gets_one_error(self):
        for _ in range(10):
            self.proto.dataReceived(b"y" * 64)
        self.proto.dataReceived(b'yyy\n{"command": ["true"]}\n')
        self.assertEqual(len(self.results()), 1)
        self.assertEqual(len(self.spawn.spawned), 1)

    def test_results_come_back_in_completion_order(self):
        self.lane = self.factory.lane = Lane(0)
        self.proto, self.transport = self.connect()
        self.proto.dataReceived(b'{"command": ["a"], "id": "a"}\n{"command": ["b"], "id": "b"}\n')
        exit_with(self.spawn.protocol(1))
        exit_with(self.spawn.protocol(0))
        self.assertEqual([r["id"] for r in self.results()], ["b", "a"])

    def test_disconnect_kills_running_and_drops_queued(self):
        self.factory.lane = Lane(1, queue=True)
        self.proto, self.transport = self.connect()
        self.proto.dataReceived(b'{"command": ["a"]}\n{"command": ["b"]}\n')
        pid = self.spawn.protocol().pid
        self.proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertIn((pid, 9), self.kills.calls)
        self.assertEqual(len(self.spawn.spawned), 1, "the queued task must not start")
        self.assertEqual(self.engine.live, {})

    def test_half_close_probes_then_delivers_and_closes(self):
        self.proto.dataReceived(b'{"command": ["a"]}\n')
        self.proto.readConnectionLost()
        self.assertFalse(self.transport.disconnecting)
        self.clock.pump([PROBE_INTERVAL, PROBE_INTERVAL])
        self.assertEqual(self.transport.value(), b"  ")
        exit_with(self.spawn.protocol())
        self.assertEqual(self.results()[0]["exit_code"], 0)
        self.assertTrue(self.transport.disconnecting)
        self.clock.pump([PROBE_INTERVAL] * 4)
        self.assertFalse(self.transport.value().endswith(b" "), "probing stops after the last result")

    def test_half_close_with_nothing_pending_closes_at_once(self):
        self.proto.readConnectionLost()
        self.assertTrue(self.transport.disconnecting)

    def test_reset_after_half_close_cancels_the_task(self):
        self.proto.dataReceived(b'{"command": ["a"]}\n')
        self.proto.readConnectionLost()
        self.proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.lane.running, 0)


FORM_POST = (b"POST / HTTP/1.1\r\nHost: 127.0.0.1:3000\r\nContent-Type: text/plain\r\n"
             b"Origin: http://evil.example\r\nContent-Length: 60\r\n\r\n"
             b'{"command": ["touch", "/tmp/pwned"], "x": "="}\r\n')
"""What a browser sends for <form enctype="text/plain" method="post" action="http://127.0.0.1:3000/">
whose one field's name and value make the body line a task request."""


class CrossProtocolTests(SynchronousTestCase):
    """A web page must not be able to run commands through the TCP door."""

    def setUp(self):
        host = FakeHost()
        self.spawn, self.engine = host.spawn, host.engine
        self.factory = TaskLineFactory(self.engine, Lane(0), "s", max_line=1 << 16, clock=host.clock)

    def connect(self):
        proto, transport = self.factory.buildProtocol(None), StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_a_browser_form_post_closes_the_connection_and_runs_nothing(self):
        proto, transport = self.connect()
        proto.dataReceived(FORM_POST)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.spawn.spawned, [])
        self.assertEqual(transport.value(), b"", "no answer that a page could read")

    def test_the_body_is_ignored_even_when_it_arrives_later(self):
        proto, transport = self.connect()
        head, body = FORM_POST.split(b"\r\n\r\n", 1)
        for byte in head + b"\r\n\r\n":
            proto.dataReceived(bytes([byte]))
        proto.dataReceived(body)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.spawn.spawned, [])

    def test_each_kind_of_http_line_closes_the_connection(self):
        for line in (b"GET / HTTP/1.1", b"GET /", b"PRI * HTTP/2.0", b"OPTIONS * HTTP/1.0",
                     b"Host: 127.0.0.1", b"content-type: text/plain", b"X-Custom-Thing:1",
                     b"  Host: indented"):
            proto, transport = self.connect()
            proto.dataReceived(line + b"\r\n" + b'{"command": ["true"]}\n')
            self.assertTrue(transport.disconnecting, line)
        self.assertEqual(self.spawn.spawned, [])

    def test_the_refusal_is_logged_as_a_security_warning_naming_the_peer(self):
        from twisted.logger import globalLogPublisher
        seen = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        proto, transport = self.connect()
        proto.dataReceived(b"POST / HTTP/1.1\r\n")
        [event] = [e for e in seen if "security" in e.get("log_format", "")]
        self.assertEqual(event["log_level"].name, "warn")
        self.assertIn("192.168.1.1", event["peer"])  # StringTransport's made-up peer

    def test_json_lines_and_garbage_are_not_taken_for_http(self):
        from agent.doors.tcp.wire import looks_like_http
        for line in (b'{"command": ["GET", "/", "HTTP/1.1"]}', b'["Host:"]', b'"a:b"', b"123",
                     b"null", b"hello world", b"get / http/1.1", b""):
            self.assertFalse(looks_like_http(line), line)


class UnencodableTextTests(SynchronousTestCase):
    """A lone surrogate is valid JSON but no argv, log or answer can carry it (issue 15)."""

    def setUp(self):
        host = FakeHost()
        self.spawn = host.spawn
        self.factory = TaskLineFactory(host.engine, Lane(0), "s", clock=host.clock)
        self.proto, self.transport = self.factory.buildProtocol(None), StringTransport()
        self.proto.makeConnection(self.transport)

    def test_a_surrogate_in_the_command_or_the_id_gets_an_error_and_the_next_line_runs(self):
        self.proto.dataReceived(b'{"command": ["echo", "\\ud800"]}\n'
                                b'{"command": ["true"], "id": "\\udfff"}\n'
                                b'{"command": ["true"], "id": "next"}\n')
        lines = self.transport.value().split(b"\n")
        first, second = json.loads(lines[0]), json.loads(lines[1])
        self.assertIn("lone surrogate", first["error"])
        self.assertEqual(first["command"], ["echo", "\ud800"], "echoed, as JSON escapes it")
        self.assertIn("lone surrogate", second["error"])
        self.assertEqual([argv for argv, _ in self.spawn.spawned], [["true"]])
        self.assertFalse(self.transport.disconnecting)

    def test_deeply_nested_json_is_a_bad_request_not_a_dropped_connection(self):
        self.proto.dataReceived(b"[" * 100_000 + b"]" * 100_000 + b"\n")
        [line] = [json.loads(l) for l in self.transport.value().split(b"\n") if l]
        self.assertEqual(line["exit_code"], -1)
        self.assertIn("nested too deeply", line["error"])
        self.assertFalse(self.transport.disconnecting)


class ProtectedModeTests(SynchronousTestCase):
    """Without client authentication the door answers only its own host (issue 15)."""

    def setUp(self):
        host = FakeHost()
        self.spawn, self.clock, self.engine = host.spawn, host.clock, host.engine

    def factory(self, protected=True):
        return TaskLineFactory(self.engine, Lane(0), "s", clock=self.clock, protected=protected)

    def connect(self, factory, address):
        proto, transport = factory.buildProtocol(address), StringTransport(peerAddress=address)
        proto.makeConnection(transport)
        return proto, transport

    def test_a_peer_from_another_host_gets_one_line_saying_how_to_enable_auth_then_the_close(self):
        from twisted.internet.address import IPv4Address
        proto, transport = self.connect(self.factory(), IPv4Address("TCP", "192.0.2.7", 40000))
        proto.dataReceived(b'{"command": ["true"]}\n')
        [line] = [json.loads(l) for l in transport.value().split(b"\n") if l]
        self.assertEqual(line["exit_code"], -1)
        self.assertIn("--protected-mode no", line["error"])
        self.assertIn("mtls", line["error"])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.spawn.spawned, [])

    def test_loopback_and_unix_socket_peers_are_served(self):
        from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
        for address in (IPv4Address("TCP", "127.0.0.1", 1), IPv4Address("TCP", "127.9.8.7", 1),
                        IPv6Address("TCP", "::1", 1), IPv6Address("TCP", "::ffff:127.0.0.1", 1),
                        UNIXAddress(b"/run/agent.sock")):
            proto, transport = self.connect(self.factory(), address)
            proto.dataReceived(b'{"command": ["true"]}\n')
            self.assertFalse(transport.disconnecting, address)
        self.assertEqual(len(self.spawn.spawned), 5)

    def test_with_protected_mode_off_any_peer_is_served(self):
        from twisted.internet.address import IPv6Address
        proto, transport = self.connect(self.factory(protected=False),
                                        IPv6Address("TCP", "2001:db8::5", 1))
        proto.dataReceived(b'{"command": ["true"]}\n')
        self.assertEqual(len(self.spawn.spawned), 1)

    def test_the_start_up_note_says_whether_the_door_is_protected(self):
        from agent.doors.tcp.protected import starting_note
        self.assertIsNone(starting_note("127.0.0.1", True))
        self.assertIn("answers only clients on this host", starting_note("0.0.0.0", True))
        self.assertIn("anyone who can reach", starting_note("0.0.0.0", False))
