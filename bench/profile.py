"""Profile the agent under one benchmark workload with py-spy, and summarise.

    python -m bench.profile serial   [--idle] [--seconds N]
    python -m bench.profile parallel
    python -m bench.profile output
    python -m bench.profile parallel --gil   # only what holds the interpreter lock

py-spy is a bench-only tool (`pip install py-spy`), not a dependency of the
agent. The summary lists the functions with the most samples, by self and
by inclusive time; --idle also counts time the reactor waits in epoll, which
shows latency (what the client waits for) rather than CPU.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from bench import client
from bench.agentproc import Agent
from bench.cases_tcp import output_request
from bench.table import MIB

_FRAME = re.compile(r"(?P<name>.*) \((?P<path>.*?):\d+\)$")


def workload(name: str, agent: Agent, seconds: float) -> str:
    """Drive the agent for about `seconds`; return what was done."""
    deadline, done = time.perf_counter() + seconds, 0
    if name == "output":
        request = output_request(200 * MIB)
        while time.perf_counter() < deadline:
            client.one_big_result(agent.tcp_port, request, 200 * MIB)
            done += 1
        return f"{done} x 200 MiB results"
    while time.perf_counter() < deadline:
        if name == "serial":
            client.serial_round_trips(agent.tcp_port, 500)
            done += 500
        else:
            client.pipelined(agent.tcp_port, 8, 1000, 8)
            done += 1000
    return f"{done} tasks"


def summarise(raw_path: str, top: int = 25) -> str:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    own, inclusive, total = collections.Counter(), collections.Counter(), 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = [_short(frame) for frame in stack.split(";")]
            total += int(count)
            own[frames[-1]] += int(count)
            for frame in set(frames):
                inclusive[frame] += int(count)
    lines = [f"{total} samples", "-- self"]
    lines += [f"{n / total * 100:5.1f}% {f}" for f, n in own.most_common(top)]
    lines += ["-- inclusive"]
    lines += [f"{n / total * 100:5.1f}% {f}" for f, n in inclusive.most_common(top * 2)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match["path"].split("site-packages/")[-1]
    return f"{match['name']} ({path.split(os.sep + 'agent' + os.sep)[-1] if '/agent/' in path else path})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("workload", choices=["serial", "parallel", "output"])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--idle", action="store_true", help="count samples waiting in epoll too")
    parser.add_argument("--gil", action="store_true",
                        help="only samples holding the interpreter lock: the agent's Python, "
                             "every thread, without the time its threads wait in the kernel")
    parser.add_argument("--raw", help="keep py-spy's collapsed stacks here")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        raise SystemExit("py-spy is not installed: pip install py-spy")
    options = ("--parallel", "0") if args.workload == "parallel" else ()
    with tempfile.TemporaryDirectory(prefix="agent-profile-") as tmp, Agent(*options) as agent:
        raw = args.raw or os.path.join(tmp, "profile.raw")
        client.serial_round_trips(agent.tcp_port, 50)
        recorder = subprocess.Popen([spy, "record", "-p", str(agent.pid), "-r", "1000", "-f", "raw",
                                     "-o", raw, *(["--idle"] if args.idle else []),
                                     *(["--gil"] if args.gil else [])],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        cpu = agent.cpu_seconds()
        began = time.perf_counter()
        what = workload(args.workload, agent, args.seconds)
        took = time.perf_counter() - began
        cpu = agent.cpu_seconds() - cpu
        recorder.send_signal(signal.SIGINT)
        recorder.wait(30)
        print(f"{args.workload}: {what} in {took:.1f} s; agent CPU {cpu:.2f} s ({cpu / took:.0%})")
        print(summarise(raw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
