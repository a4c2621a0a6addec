"""The leanest Python agent of this shape, as a floor for the serial and parallel ratios.

    python -m bench.leanest [--rounds 3] [--tasks 400]

One thread, one epoll, no Twisted, no history, no log: read a request line,
json.loads it, posix_spawnp the command (its own process group, stdout on a
pipe), wait for the pipe's EOF and a pidfd, json.dumps the result, send it.
It keeps none of the agent's guarantees (timeouts, limits, cancel, records)
and is no agent; it measures, on this machine, in the same run as the
baselines of `make bench`, what the wake-ups and system calls of a task
cost before any of the agent's own work: the ratio a Python agent of this
shape cannot get under. Served from a subprocess, driven by bench.client.
"""
from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time

from bench import baseline, client


def serve() -> None:  # pragma: no cover - runs in its own process
    """The leanest agent: prints its port, serves until killed."""
    environment = dict(os.environb)
    devnull = os.open(os.devnull, os.O_RDWR)
    selector = selectors.EpollSelector()
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    selector.register(server, selectors.EVENT_READ, ("accept", None))
    print(server.getsockname()[1], flush=True)
    buffers: dict[socket.socket, bytes] = {}
    while True:
        for key, _ in selector.select():
            kind, item = key.data
            if kind == "accept":
                conn, _ = server.accept()
                conn.setblocking(False)
                buffers[conn] = b""
                selector.register(conn, selectors.EVENT_READ, ("conn", conn))
            elif kind == "conn":
                _request(selector, item, buffers, environment, devnull)
            else:
                _child_event(selector, kind, item)


def _request(selector, conn, buffers, environment, devnull) -> None:
    data = conn.recv(65536)
    if not data:
        selector.unregister(conn)
        conn.close()
        del buffers[conn]
        return
    pending = buffers[conn] + data
    while b"\n" in pending:
        line, pending = pending.split(b"\n", 1)
        argv = json.loads(line)["command"]
        read_end, write_end = os.pipe()
        started = time.time()
        pid = os.posix_spawnp(argv[0], argv, environment, setpgroup=0,
                              setsigdef=[signal.SIGPIPE],
                              file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 0),
                                            (os.POSIX_SPAWN_DUP2, write_end, 1),
                                            (os.POSIX_SPAWN_DUP2, devnull, 2)])
        os.close(write_end)
        os.set_blocking(read_end, False)
        task = {"conn": conn, "argv": argv, "pid": pid, "pipe": read_end,
                "pidfd": os.pidfd_open(pid), "output": [], "left": 2, "started": started}
        selector.register(read_end, selectors.EVENT_READ, ("pipe", task))
        selector.register(task["pidfd"], selectors.EVENT_READ, ("exit", task))
    buffers[conn] = pending


def _child_event(selector, kind, task) -> None:
    if kind == "pipe":
        data = os.read(task["pipe"], 1 << 20)
        if data:
            task["output"].append(data)
            return
        selector.unregister(task["pipe"])
        os.close(task["pipe"])
    else:
        _, status = os.waitpid(task["pid"], 0)
        task["exit_code"] = os.waitstatus_to_exitcode(status)
        selector.unregister(task["pidfd"])
        os.close(task["pidfd"])
    task["left"] -= 1
    if not task["left"]:
        result = {"command": task["argv"], "executed_at": int(task["started"]),
                  "duration_ms": round((time.time() - task["started"]) * 1000, 3),
                  "exit_code": task["exit_code"],
                  "output": b"".join(task["output"]).decode("utf-8", "replace"), "error": ""}
        task["conn"].sendall(json.dumps(result).encode() + b"\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.leanest", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=400,
                        help="serial tasks a round (parallel: five times as many)")
    args = parser.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "bench.leanest", "--serve"],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=here))
    try:
        port = int(proc.stdout.readline())
        client.serial_round_trips(port, 100)
        baseline.spawn_loop(100)
        lean, base, lean_rates, base_rates = [], [], [], []
        for _ in range(args.rounds):
            lean += client.serial_round_trips(port, args.tasks)
            base += baseline.spawn_loop(args.tasks)
            lean_rates.append(5 * args.tasks / client.pipelined(port, 8, 5 * args.tasks, 8))
            base_rates.append(baseline.parallel_spawn_rate(2, 0.75))
    finally:
        proc.kill()
        proc.wait()
    serial = statistics.median(lean) / statistics.median(base)
    parallel = statistics.median(lean_rates) / statistics.median(base_rates)
    print(f"leanest Python agent: serial {statistics.median(lean) * 1000:.3f} ms against "
          f"{statistics.median(base) * 1000:.3f} ms ({serial:.2f}x); parallel "
          f"{statistics.median(lean_rates):.0f} against {statistics.median(base_rates):.0f} "
          f"tasks/s ({parallel:.2f}x)")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    raise SystemExit(main())
