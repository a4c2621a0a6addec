"""A TCP relay between agents and PostgreSQL that a test can cut as a network would:
while cut, bytes stop moving in both directions and new connections hang (no reset,
no close), so only timeouts tell the agent; mended, everything flows again."""
from __future__ import annotations

import selectors
import socket
import threading


class NetCut:
    def __init__(self, target_port: int, host: str = "127.0.0.1"):
        self._target = (host, target_port)
        self._listener = socket.create_server((host, 0))
        self.port = self._listener.getsockname()[1]
        self._cut = threading.Event()
        self._stop = threading.Event()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._thread = threading.Thread(target=self._relay, daemon=True, name="netcut")
        self._thread.start()

    def cut(self) -> None:
        self._cut.set()

    def mend(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()
        for a, b in self._pairs:
            a.close()
            b.close()

    def _relay(self) -> None:
        selector = selectors.DefaultSelector()
        self._listener.setblocking(False)
        selector.register(self._listener, selectors.EVENT_READ, None)
        while not self._stop.is_set():
            if self._cut.is_set():
                self._stop.wait(0.05)  # nothing moves, nothing is accepted
                continue
            for key, _ in selector.select(0.05):
                if key.data is None:
                    self._accept(selector)
                else:
                    self._forward(selector, key.fileobj, key.data)
        selector.close()

    def _accept(self, selector) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            server = socket.create_connection(self._target, timeout=5)
        except OSError:
            client.close()
            return
        self._pairs.append((client, server))
        for a, b in ((client, server), (server, client)):
            a.setblocking(False)
            selector.register(a, selectors.EVENT_READ, b)

    def _forward(self, selector, source: socket.socket, sink: socket.socket) -> None:
        try:
            data = source.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            for s in (source, sink):
                try:
                    selector.unregister(s)
                except (KeyError, ValueError):
                    pass
                s.close()
            return
        sink.setblocking(True)
        try:
            sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.setblocking(False)
