"""The LineWriter: lines in order, pieces made only as fast as the client takes
them, the bytes it holds counted, and nothing kept for a client that has gone."""
from __future__ import annotations

import socket
from contextlib import asynccontextmanager

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread

from agent._twisted_compat import socket_idle
from agent.doors.tcp.linewriter import Budget, Line, LineWriter, send_now
from tests.doors.tcp.slow import SlowTransport


def joined(chunks):
    for chunk in chunks:
        yield chunk.upper()
    yield b"\n"


def test_a_client_that_keeps_up_gets_each_line_at_once():
    transport = StringTransport()
    writer = LineWriter(transport)
    writer.write(b"one\n")
    writer.queue(Line.encoded(joined, [b"t", b"wo"], 3))
    assert transport.value() == b"one\nTWO\n"
    assert writer.idle and writer.held == 0


def test_lines_wait_while_the_client_is_behind_and_come_in_order():
    transport = SlowTransport(room=4)
    writer = LineWriter(transport)
    writer.queue(Line.encoded(joined, [b"big", b"-line"], 8))
    writer.write(b"small\n")
    assert transport.value() == b"BIG-LINE", "paused after the transport filled up"
    assert not writer.idle
    assert transport.read_all() == b"BIG-LINE\nsmall\n"
    assert writer.idle and writer.held == 0


def test_pieces_are_made_only_when_the_transport_has_room():
    transport = SlowTransport(room=0)
    writer = LineWriter(transport)
    made = []

    def pieces(chunks):
        for chunk in chunks:
            made.append(chunk)
            yield chunk

    writer.queue(Line.encoded(pieces, [b"a", b"b", b"c"], 3))
    assert made == [b"a"]
    transport.read()
    assert made == [b"a", b"b"]


def test_held_counts_the_output_still_in_memory():
    transport = SlowTransport(room=0)
    budget = Recorder()
    writer = LineWriter(transport, budget)
    writer.queue(Line.encoded(joined, [b"x" * 10, b"y" * 20], 30))
    assert writer.held == 20, "the first chunk is in the transport"
    writer.write(b"z" * 7 + b"\n")
    assert writer.held == 28
    transport.read_all()
    assert writer.held == 0 and budget.held == 0


def test_a_lost_connection_drops_what_is_queued_and_counts_it_gone():
    transport = SlowTransport(room=0)
    budget = Recorder()
    writer = LineWriter(transport, budget)
    closed = []

    def pieces(chunks):
        try:
            yield from chunks
        finally:
            closed.append(True)

    writer.queue(Line.encoded(pieces, [b"a", b"b"], 2))
    writer.queue(Line.encoded(pieces, [b"c"], 1))
    writer.stopProducing()
    writer.write(b"late\n")
    assert writer.idle and transport.value() == b"a"
    assert closed == [True], "the line begun is closed (the other never started)"
    assert budget.held == 0 and budget.behind == set()


def test_close_waits_for_the_queue_then_unregisters_before_closing():
    transport = SlowTransport(room=0)
    writer = LineWriter(transport)
    writer.queue(Line.encoded(joined, [b"a", b"b"], 2))
    writer.close()
    assert not transport.disconnecting
    assert transport.read_all() == b"AB\n"
    assert transport.producer is None and transport.disconnecting


def test_congestion_is_a_whole_line_waiting_behind_a_full_transport():
    transport = SlowTransport(room=2)
    seen = []
    writer = LineWriter(transport, congested=seen.append)
    writer.write(b"first\n")
    assert seen == [], "one line in a full transport is a client reading, not one behind"
    writer.write(b"second\n")
    assert seen == [True]
    transport.read_all()
    assert seen == [True, False]


class Recorder(Budget):
    def __init__(self):
        self.held = 0
        self.behind = set()

    def add(self, delta):
        self.held += delta

    def paused(self, writer):
        self.behind.add(writer)

    def resumed(self, writer):
        self.behind.discard(writer)


# -- a real socket: sent at once, the rest in order


@pytest_twisted.ensureDeferred
async def test_a_line_to_an_idle_socket_is_sent_before_the_reactor_turns():
    async with _socket_pair() as (transport, client):
        send_now(transport, b"result\n")
        client.setblocking(False)
        assert client.recv(100) == b"result\n", "in the kernel already, not in a buffer"


@pytest_twisted.ensureDeferred
async def test_what_the_socket_does_not_take_follows_through_the_transport_in_order():
    async with _socket_pair(send_buffer=4096) as (transport, client):
        first, second = b"a" * (1 << 20), b"b" * 1000
        send_now(transport, first)
        assert not socket_idle(transport), "the kernel took part; the transport holds the rest"
        send_now(transport, second)  # must not overtake what the transport holds
        received = await deferToThread(_receive, client, len(first) + len(second))
        assert received == first + second


def _receive(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(30)
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(1 << 20)
        assert chunk, "connection closed early"
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


@asynccontextmanager
async def _socket_pair(send_buffer: int | None = None):
    """(the agent side's transport, a plain client socket) over 127.0.0.1."""
    from twisted.internet import reactor

    connected: Deferred = Deferred()

    class Server(Protocol):
        def connectionMade(self):
            if send_buffer is not None:
                self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                                                      send_buffer)
            connected.callback(self.transport)

    port = reactor.listenTCP(0, Factory.forProtocol(Server), interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    try:
        transport = await connected
        yield transport, client
        transport.loseConnection()
    finally:
        client.close()
        await port.stopListening()
