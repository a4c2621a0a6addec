"""Hostile HTTP clients are refused early: huge announced bodies, dribbled headers."""
from __future__ import annotations

import io

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from agent.doors.http.api import HEADER_DEADLINE, IDLE_TIMEOUT, ApiSite


class Fine(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"fine"


class HostileClients(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        root = Resource()
        root.putChild(b"ok", Fine())
        root.putChild(b"healthz", Fine())
        self.site = ApiSite(root, reactor=self.clock)
        self.channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def tearDown(self):
        self.channel.connectionLost(None)

    def test_a_huge_announced_body_is_refused_before_it_is_sent(self):
        self.channel.dataReceived(b"POST /tasks HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 104857600\r\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertIn(b"larger than 1048576 bytes", self.transport.value())
        self.assertTrue(self.transport.disconnecting)

    def test_a_chunked_body_is_refused_once_it_passes_the_cap(self):
        self.channel.dataReceived(b"POST /ok HTTP/1.1\r\nHost: x\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (64 << 10, b"x" * (64 << 10))
        sent = 0
        while not self.transport.disconnecting and sent < 100 << 20:
            self.channel.dataReceived(chunk)
            sent += 64 << 10
        self.assertLessEqual(sent, (1 << 20) + (64 << 10), "read far past the cap")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 413 "))
        self.channel.dataReceived(chunk + b"0\r\n\r\n")  # the rest of the body changes nothing
        self.assertEqual(self.transport.value().count(b"HTTP/1.1"), 1)

    def test_headers_dribbled_past_the_deadline_drop_the_client(self):
        for byte in b"GET /ok HTTP/1.1\r\nHost: x\r\n":
            self.channel.dataReceived(bytes([byte]))
            self.clock.advance(HEADER_DEADLINE / 40)  # every byte resets the idle timeout
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(HEADER_DEADLINE)
        self.assertTrue(self.transport.disconnecting or self.transport.disconnected)

    def test_a_prompt_client_is_served_and_may_send_another_request(self):
        self.channel.dataReceived(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"fine", self.transport.value())
        self.clock.advance(HEADER_DEADLINE - 1)
        self.channel.dataReceived(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.transport.value().count(b"fine"), 2)
        self.assertFalse(self.transport.disconnecting)

    def test_every_request_is_logged_but_a_healthy_healthz(self):
        self.site._logFile = io.StringIO()
        for path in (b"/healthz", b"/ok", b"/healthz", b"/ok?again"):
            self.channel.dataReceived(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
        logged = self.site._logFile.getvalue().splitlines()
        self.assertEqual([line.split('"')[3] for line in logged],
                         ["GET /ok HTTP/1.1", "GET /ok?again HTTP/1.1"])

    def test_idle_timeout_is_a_minute_not_twelve_hours(self):
        self.assertEqual(self.site.timeOut, IDLE_TIMEOUT)
