"""The bare limits the agent is compared with, measured in the same run.

- spawn: a Python loop of os.posix_spawn + waitpid of /bin/true, what the
  serial case is compared with (and two of them, in two processes, what the
  parallel case is compared with);
- output: the same producer the agent's large-output task runs
  (`yes LINE | head -c N`) writing straight into a loopback TCP socket that
  this process reads to the end: the bytes must at least cross a socket, so
  that is the floor of any agent that sends them to a client.

`python -m bench.baseline spawn-loop SECONDS` is the loop run in the parallel
baseline's worker processes: it prints how many spawns it made, in how many
seconds, and the CPU seconds it and its children spent (bench.budget).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

TRUE = "/bin/true"

OUTPUT_LINE = (bytes(c for c in range(32, 127) if c not in b'"\\') * 2)[:79].decode("ascii")
"""Printable ASCII with neither quote nor backslash: in JSON only the newline `yes`
adds needs escaping, so the agent's encoding is measured, not the escaping of odd text."""


def spawn_loop(count: int) -> list[float]:
    """Seconds per os.posix_spawn + waitpid of /bin/true, one after another."""
    environment = dict(os.environ)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        pid = os.posix_spawn(TRUE, [TRUE], environment)
        os.waitpid(pid, 0)
        times.append(time.perf_counter() - started)
    return times


def spawns_for(seconds: float) -> tuple[int, float]:
    """Run the loop for about `seconds`; return (spawns, seconds taken)."""
    environment = dict(os.environ)
    count, started = 0, time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        pid = os.posix_spawn(TRUE, [TRUE], environment)
        os.waitpid(pid, 0)
        count += 1
    return count, time.perf_counter() - started


def parallel_spawn_rate(processes: int, seconds: float) -> float:
    """Spawns per second of `processes` interpreters running the loop side by side."""
    argv = [sys.executable, "-m", "bench.baseline", "spawn-loop", str(seconds)]
    env = dict(os.environ, PYTHONPATH=_repo())
    workers = [subprocess.Popen(argv, stdout=subprocess.PIPE, env=env, text=True)
               for _ in range(processes)]
    rates = []
    for worker in workers:
        count, taken = worker.communicate()[0].split()[:2]
        rates.append(int(count) / float(taken))
    return sum(rates)


def producer_argv(size: int) -> list[str]:
    """`size` bytes of OUTPUT_LINE lines on stdout, the agent's task and the floor's alike."""
    return ["sh", "-c", 'yes "$0" | head -c "$1"', OUTPUT_LINE, str(size)]


def socket_floor_seconds(size: int, buffer: bytearray | None = None) -> float:
    """Wall seconds from spawning the producer with a loopback TCP socket as its stdout
    to the last of its `size` bytes received here (into one preallocated buffer, as the
    agent's client receives its result line)."""
    if buffer is None or len(buffer) <= size:
        buffer = bytearray(size + 1)  # room for one byte more, to tell "too much" from EOF
    with socket.create_server(("127.0.0.1", 0)) as listener:
        writer = socket.create_connection(listener.getsockname())
        reader, _ = listener.accept()
    with reader:
        started = time.perf_counter()
        try:
            argv = producer_argv(size)
            pid = os.posix_spawnp(argv[0], argv, os.environ,
                                  file_actions=[(os.POSIX_SPAWN_DUP2, writer.fileno(), 1)],
                                  setsigdef=[signal.SIGPIPE])  # as the agent's tasks get it
        finally:
            writer.close()  # the producer holds the only write end: its exit is our EOF
        received = _receive_to_end(reader, buffer)
        took = time.perf_counter() - started
        os.waitpid(pid, 0)
    if received != size:
        raise RuntimeError(f"the producer wrote {received} bytes, not {size}")
    return took


def _receive_to_end(sock: socket.socket, buffer: bytearray) -> int:
    received = 0
    with memoryview(buffer) as view:
        while True:
            if received == len(buffer):
                raise RuntimeError(f"the producer wrote more than {len(buffer)} bytes")
            n = sock.recv_into(view[received:])
            if not n:
                return received
            received += n


def _repo() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu() -> tuple[float, float]:
    """(this process's, its reaped children's) CPU seconds."""
    import resource
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                         resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


if __name__ == "__main__":
    if sys.argv[1:2] == ["spawn-loop"]:
        spawn_loop(50)  # warm up the page cache and the allocator
        cpu_before = _cpu()
        spawned, took = spawns_for(float(sys.argv[2]))
        cpu_after = _cpu()
        print(spawned, took, *(after - before for after, before in zip(cpu_after, cpu_before)))
