"""A transport whose client reads only when a test says so."""
from __future__ import annotations

from twisted.internet.testing import StringTransport


class SlowTransport(StringTransport):
    """Past `room` bytes unread it pauses its streaming producer, as a real
    transport does past its buffer size; read() is the client taking them."""

    def __init__(self, room: int = 64, **kwargs):
        super().__init__(**kwargs)
        self.room = room
        self.received = b""

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and self.streaming and len(self.value()) > self.room:
            self.producer.pauseProducing()

    def read(self) -> bytes:
        """The client takes what was sent; the transport, now empty, asks for more."""
        data = self.value()
        self.clear()
        self.received += data
        if self.producer is not None:
            self.producer.resumeProducing()
        return data

    def read_all(self) -> bytes:
        while self.read():
            pass
        return self.received
