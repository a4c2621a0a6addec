"""A lean TCP line client: raw blocking sockets and one selector, no framework.

Its cost per task (a send, a recv, one json.loads) is a few microseconds,
well under a tenth of what the agent spends, so the figures are the agent's.
"""
from __future__ import annotations

import ctypes
import json
import selectors
import socket
import time

TRUE_REQUEST = b'{"command": ["/bin/true"]}\n'


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class LineReader:
    """Splits a socket's bytes into lines without copying what is already split."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""

    def lines(self) -> list[bytes]:
        """Block for at least one complete line; return every complete line received."""
        while True:
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError("agent closed the connection")
            self.buffer += data
            if b"\n" in data:
                *lines, self.buffer = self.buffer.split(b"\n")
                return lines


def check(line: bytes) -> dict:
    result = json.loads(line)
    if result.get("exit_code") != 0:
        raise RuntimeError(f"task failed: {result}")
    return result


def serial_round_trips(port: int, count: int, request: bytes = TRUE_REQUEST) -> list[float]:
    """Seconds per task, one connection, the next request sent once the last result is parsed."""
    sock = connect(port)
    reader = LineReader(sock)
    times = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            sock.sendall(request)
            lines = reader.lines()
            check(lines[0])
            times.append(time.perf_counter() - started)
    finally:
        sock.close()
    return times


def pipelined(port: int, connections: int, total: int, window: int,
              request: bytes = TRUE_REQUEST) -> float:
    """Run `total` tasks over several connections, each keeping `window` requests in flight.

    Returns the seconds from the first request to the last parsed result.
    """
    selector = selectors.DefaultSelector()
    socks = [connect(port) for _ in range(connections)]
    state = {}
    to_send = total
    started = time.perf_counter()
    for sock in socks:
        burst = min(window, to_send)
        to_send -= burst
        sock.sendall(request * burst)
        state[sock] = LineReader(sock)
        selector.register(sock, selectors.EVENT_READ)
    done = 0
    try:
        while done < total:
            for key, _ in selector.select():
                reader = state[key.fileobj]
                lines = reader.lines()
                for line in lines:
                    check(line)
                done += len(lines)
                refill = min(len(lines), to_send)
                if refill:
                    to_send -= refill
                    key.fileobj.sendall(request * refill)
        return time.perf_counter() - started
    finally:
        selector.close()
        for sock in socks:
            sock.close()


def all_at_once(port: int, requests: list[bytes], connections: int) -> float:
    """Send every request at once (spread over connections); seconds until the last result."""
    socks = [connect(port) for _ in range(connections)]
    share = [requests[i::connections] for i in range(connections)]
    started = time.perf_counter()
    for sock, mine in zip(socks, share):
        sock.sendall(b"".join(mine))
    try:
        for sock, mine in zip(socks, share):
            reader, got = LineReader(sock), 0
            while got < len(mine):
                lines = reader.lines()
                for line in lines:
                    check(line)
                got += len(lines)
        return time.perf_counter() - started
    finally:
        for sock in socks:
            sock.close()


def keep_heap() -> bool:
    """Have glibc keep freed memory in this process's heap instead of unmapping it.

    Parsing a 200 MiB result allocates ~600 MiB (the decoded text, the
    string being built, its growth); by default glibc maps and unmaps those
    blocks for each parse, and on this VM the page faults for touching them
    afresh made json.loads take 0.25-1.0 s instead of 0.09 s: the client,
    not the agent, would set the figure. Returns False where it cannot (not glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30))


def one_big_result(port: int, request: bytes, expected_size: int) -> tuple[float, float]:
    """Run one task with a large output; return (seconds to the parsed result, parse seconds).

    The line is received into one preallocated buffer (no quadratic joins) and
    parsed with the stdlib json module, as a scheduler would. The buffer has room
    for the line's escapes too (log-like text: a newline, escaped in two bytes,
    every 80): growing it while receiving copies and faults in hundreds of
    megabytes, and measured the client instead of the agent.
    """
    sock = connect(port)
    buffer = bytearray(expected_size + expected_size // 8 + (1 << 20))
    received = 0
    try:
        started = time.perf_counter()
        sock.sendall(request)
        while True:
            if received == len(buffer):
                buffer.extend(bytes(len(buffer)))
            with memoryview(buffer) as view:
                n = sock.recv_into(view[received:])
            if not n:
                raise EOFError("agent closed the connection")
            received += n
            if buffer.find(b"\n", received - n, received) >= 0:
                break
        del buffer[received:]
        parse_started = time.perf_counter()
        result = check(buffer)
        finished = time.perf_counter()
    finally:
        sock.close()
    if len(result["output"]) != expected_size:
        raise RuntimeError(f"output was {len(result['output'])} characters, not {expected_size}")
    return finished - started, finished - parse_started
