"""Compare two checkouts' agents on this machine, before and after a change.

    python -m bench.compare OLD_CHECKOUT NEW_CHECKOUT [--pairs 10] [--case serial|parallel|output]

On a shared virtual machine two agents running the same code differ by up
to 0.1x on the serial ratio, and the machine's speed drifts from minute to
minute, so one run of each side proves little. This starts a fresh pair of
agents (one per checkout) for each of --pairs rounds, alternates which goes
first, lets them take turns with the baseline (the spawn loop, or for
output the socket floor of bench.baseline), and pools the samples. A
checkout is any directory with agent/ and twisted/plugins/, e.g.
`git archive COMMIT | tar -x -C DIR`.
"""
from __future__ import annotations

import argparse
import os
import statistics

from bench import baseline, client
from bench.agentproc import AGENT_REPO_VARIABLE, Agent
from bench.cases_tcp import output_request
from bench.table import MIB

OUTPUT_SIZE = 200 * MIB


class Side:
    def __init__(self, repo: str):
        self.repo = os.path.abspath(repo)
        self.samples: list[float] = []
        self.cpu: list[float] = []
        self.rss_growth: list[int] = []

    def start(self, *args: str) -> Agent:
        os.environ[AGENT_REPO_VARIABLE] = self.repo
        return Agent(*args)


def serial_round(agent: Agent, side: Side, tasks: int = 200) -> None:
    cpu = agent.cpu_seconds()
    times = client.serial_round_trips(agent.tcp_port, tasks)
    side.samples += times
    side.cpu.append((agent.cpu_seconds() - cpu) / tasks)


def parallel_round(agent: Agent, side: Side, tasks: int = 1000) -> None:
    cpu = agent.cpu_seconds()
    seconds = client.pipelined(agent.tcp_port, 8, tasks, 8)
    side.samples.append(tasks / seconds)
    side.cpu.append((agent.cpu_seconds() - cpu) / tasks)


def output_round(agent: Agent, side: Side) -> None:
    cpu = agent.cpu_seconds()
    seconds, _ = client.one_big_result(agent.tcp_port, output_request(OUTPUT_SIZE), OUTPUT_SIZE)
    side.samples.append(OUTPUT_SIZE / MIB / seconds)
    side.cpu.append(agent.cpu_seconds() - cpu)


ROUNDS = {"serial": (serial_round, 5), "parallel": (parallel_round, 5), "output": (output_round, 2)}


def compare(old: Side, new: Side, case: str, pairs: int) -> tuple[float, list[float]]:
    options = ("--parallel", "0") if case == "parallel" else ()
    measure, rounds = ROUNDS[case]
    buffer = bytearray(OUTPUT_SIZE + MIB) if case == "output" else None
    base: list[float] = []
    for n in range(pairs):
        sides = (old, new) if n % 2 == 0 else (new, old)
        agents = [side.start(*options) for side in sides]
        idle = [agent.rss()[0] for agent in agents]
        try:
            for agent in agents:
                client.serial_round_trips(agent.tcp_port, 50)
            for _ in range(rounds):
                for agent, side in zip(agents, sides):
                    measure(agent, side)
                if case == "parallel":
                    base.append(baseline.parallel_spawn_rate(2, 0.4))
                elif case == "output":
                    base.append(OUTPUT_SIZE / MIB / baseline.socket_floor_seconds(OUTPUT_SIZE, buffer))
                else:
                    base += baseline.spawn_loop(200)
            for agent, side, before in zip(agents, sides, idle):
                side.rss_growth.append(agent.rss()[1] - before)
        finally:
            for agent in agents:
                agent.stop()
    return statistics.median(base), base


def report(label: str, side: Side, case: str, base: float) -> str:
    figure = statistics.median(side.samples)
    spread = f"[{min(side.samples):.4g} .. {max(side.samples):.4g}]"
    if case == "parallel":
        return (f"{label}: {figure:.0f} tasks/s ({figure / base:.2f}x of {base:.0f}) {spread}, "
                f"agent CPU {statistics.mean(side.cpu) * 1000:.3f} ms/task  [{side.repo}]")
    if case == "output":
        return (f"{label}: {figure:.0f} MiB/s ({figure / base:.2f}x of {base:.0f}) {spread}, "
                f"agent CPU {statistics.median(side.cpu):.3f} s a result, peak RSS growth "
                f"{max(side.rss_growth) / MIB:.0f} MiB  [{side.repo}]")
    return (f"{label}: {figure * 1000:.3f} ms ({figure / base:.2f}x of {base * 1000:.3f}), "
            f"agent CPU {statistics.mean(side.cpu) * 1000:.3f} ms/task  [{side.repo}]")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--case", choices=tuple(ROUNDS), default="serial")
    args = parser.parse_args(argv)
    if args.case == "output":
        client.keep_heap()
    old, new = Side(args.old), Side(args.new)
    base, _ = compare(old, new, args.case, args.pairs)
    for label, side in (("old", old), ("new", new)):
        print(report(label, side, args.case, base))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
