"""Where the parallel case's two cores go: the CPU a task costs each process.

    python -m bench.budget [--tasks 4000] [--rounds 3] [--seconds 1]

Under the parallel load of `make bench` (8 connections x 8 requests in
flight, `--parallel 0`) every core is busy, so the throughput is bounded by
the CPU a task costs, whichever process spends it: the child itself
(/bin/true: exec, the dynamic loader, exit), the agent that serves it (every
thread, and its watchdog), and the benchmark's client. The baseline, the
spawn loop in two processes, spends the child's CPU and its loop's.

So on N cores an agent cannot pass N / (child + agent + client) tasks a
second, however many processes or threads it spreads its work over, and the
ratio to the loop, N / (child + loop), is bounded the same way. This prints
each share in milliseconds of CPU a task, measured in one run from
/proc/PID/stat (the process's own time, and its reaped children's) and
getrusage, for the loop, the leanest Python agent (bench.leanest) and this
agent; the ceiling each one's CPU allows; and the agent CPU a task the
issue's target (0.8x) would need, given the child's and the client's.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from bench import client
from bench.agentproc import TICKS, Agent

TARGET = 0.8
CONNECTIONS, WINDOW = 8, 8


@dataclass
class Share:
    """CPU seconds a task, by who spent them, and the tasks a second reached."""
    own: float
    children: float
    client: float
    rate: float

    def total(self) -> float:
        return self.own + self.children + self.client


def _stat(pid: int) -> tuple[float, float]:
    """(own, reaped children's) CPU seconds of a process, every thread counted."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / TICKS
    children = (int(fields[13]) + int(fields[14])) / TICKS
    return own, children


def _descendants(pid: int) -> list[int]:
    """The agent's long-lived helper processes (its watchdog), not its tasks."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent = f.read().rsplit(")", 1)[1].split()[1]
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    command = f.read()
            except OSError:
                continue
            if parent == str(pid) and b"watchdog" in command:
                found.append(int(entry))
    return found


def _client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def served(pid: int, port: int, tasks: int) -> Share:
    """Run the parallel load against a server; its CPU a task, its children's, the client's."""
    helpers = _descendants(pid)
    before = [_stat(p) for p in (pid, *helpers)]
    client_before = _client_cpu()
    took = client.pipelined(port, CONNECTIONS, tasks, WINDOW)
    client_cpu = _client_cpu() - client_before
    after = [_stat(p) for p in (pid, *helpers)]
    own = sum(a[0] - b[0] for a, b in zip(after, before))
    children = after[0][1] - before[0][1]
    return Share(own / tasks, children / tasks, client_cpu / tasks, tasks / took)


def loop(seconds: float) -> Share:
    """The spawn loop in two processes, the very workers `make bench` runs; their CPU a spawn."""
    argv = [sys.executable, "-m", "bench.baseline", "spawn-loop", str(seconds)]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    workers = [subprocess.Popen(argv, stdout=subprocess.PIPE, env=env, text=True)
               for _ in range(2)]
    spawns = own = children = rate = 0.0
    for worker in workers:
        count, taken, own_cpu, children_cpu = map(float, worker.communicate()[0].split())
        spawns += count
        own += own_cpu
        children += children_cpu
        rate += count / taken
    return Share(own / spawns, children / spawns, 0.0, rate)


def _median_share(shares: list[Share]) -> Share:
    return Share(*(statistics.median(getattr(s, name) for s in shares)
                   for name in ("own", "children", "client", "rate")))


def report(name: str, share: Share, base: Share, cores: int) -> str:
    ceiling = cores / share.total()
    return (f"| {name} | {share.children * 1e3:.3f} | {share.own * 1e3:.3f} | "
            f"{share.client * 1e3:.3f} | {share.total() * 1e3:.3f} | {share.rate:.0f} "
            f"({share.rate / base.rate:.2f}x) | {ceiling:.0f} ({ceiling / base.rate:.2f}x) |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.budget",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0, help="of the spawn loop a round")
    args = parser.parse_args(argv)
    cores = os.cpu_count() or 1
    lean_server = subprocess.Popen(
        [sys.executable, "-m", "bench.leanest", "--serve"], stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    bases, leans, agents = [], [], []
    try:
        lean_port = int(lean_server.stdout.readline())
        with Agent("--parallel", "0") as agent:
            client.serial_round_trips(agent.tcp_port, 200)
            client.serial_round_trips(lean_port, 200)
            for _ in range(args.rounds):
                bases.append(loop(args.seconds))
                leans.append(served(lean_server.pid, lean_port, args.tasks))
                agents.append(served(agent.pid, agent.tcp_port, args.tasks))
    finally:
        lean_server.kill()
        lean_server.wait()
    base, lean, ours = _median_share(bases), _median_share(leans), _median_share(agents)
    child, clients = ours.children, ours.client
    needed = cores / (TARGET * base.rate) - child - clients
    print(f"CPU a task under the parallel load, ms (median of {args.rounds} rounds, "
          f"{cores} cores; ceiling = cores / total CPU a task):\n")
    print("| | child | its server (loop, agent) | client | total | tasks/s (ratio) | ceiling (ratio) |")
    print("|---|---|---|---|---|---|---|")
    print(report("spawn loop x2 (the baseline)", base, base, cores))
    print(report("leanest Python agent", lean, base, cores))
    print(report("this agent", ours, base, cores))
    print(f"\n{TARGET}x of the loop is {TARGET * base.rate:.0f} tasks/s: {cores} cores allow "
          f"{cores / (TARGET * base.rate) * 1e3:.3f} ms of CPU a task; the child and the client "
          f"take {(child + clients) * 1e3:.3f}, which leaves the agent {needed * 1e3:.3f} ms "
          f"(it spends {ours.own * 1e3:.3f}; the leanest Python agent {lean.own * 1e3:.3f}).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
