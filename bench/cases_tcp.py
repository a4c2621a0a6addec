"""The TCP cases and start-up: each starts its own agent, so one case's
memory peak or leftover state cannot leak into the next one's figures."""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

from bench import baseline, client
from bench.agentproc import Agent
from bench.table import MIB, Row


@dataclass(frozen=True)
class Sizes:
    serial_tasks: int = 2000
    serial_rounds: int = 10
    parallel_tasks: int = 8000
    parallel_rounds: int = 4
    parallel_connections: int = 8
    parallel_window: int = 8
    baseline_seconds: float = 3.0
    concurrent_tasks: int = 1000
    sleep_seconds: float = 1.0
    output_mib: int = 200
    output_runs: int = 5
    startup_runs: int = 3
    endless_mib: int = 1024
    follow_lines: int = 300
    history_tasks: int = 100_000
    history_requests: int = 200


FULL = Sizes()
QUICK = Sizes(serial_tasks=200, serial_rounds=2, parallel_tasks=600, parallel_rounds=1,
              baseline_seconds=0.5,
              concurrent_tasks=100, sleep_seconds=0.5, output_mib=16, output_runs=1,
              startup_runs=1, endless_mib=32, follow_lines=40, history_tasks=2000,
              history_requests=10)


def serial(sizes: Sizes) -> list[Row]:
    """Median round trip of /bin/true, one at a time, against posix_spawn + waitpid.

    Agent and baseline run in alternating blocks, so a slow patch of the
    machine weighs on both.
    """
    block = sizes.serial_tasks // sizes.serial_rounds
    agent_times: list[float] = []
    base_times: list[float] = []
    with Agent() as agent:
        client.serial_round_trips(agent.tcp_port, 50)
        baseline.spawn_loop(50)
        cpu = 0.0
        for _ in range(sizes.serial_rounds):
            before = agent.cpu_seconds()
            agent_times += client.serial_round_trips(agent.tcp_port, block)
            cpu += agent.cpu_seconds() - before
            base_times += baseline.spawn_loop(block)
    agent_ms = statistics.median(agent_times) * 1000
    base_ms = statistics.median(base_times) * 1000
    ratio = agent_ms / base_ms
    return [Row(f"serial round trip ({len(agent_times)} x /bin/true)", f"{agent_ms:.3f} ms",
                f"{base_ms:.3f} ms", f"{ratio:.2f}x", "<= 1.3x", ratio <= 1.3,
                {"agent_ms": agent_ms, "baseline_ms": base_ms, "ratio": ratio,
                 "agent_p90_ms": _percentile(agent_times, 90) * 1000,
                 "agent_p99_ms": _percentile(agent_times, 99) * 1000,
                 "agent_cpu_ms_per_task": cpu / len(agent_times) * 1000})]


def parallel(sizes: Sizes) -> list[Row]:
    """Tasks/s with --parallel 0 over pipelining connections, against 2 spawn loops.

    Agent and baseline take turns in rounds, so a slow patch of the machine
    weighs on both.
    """
    tasks = sizes.parallel_tasks // sizes.parallel_rounds
    agent_seconds = cpu = 0.0
    base_rates = []
    with Agent("--parallel", "0") as agent:
        client.pipelined(agent.tcp_port, sizes.parallel_connections, tasks // 4,
                         sizes.parallel_window)
        for _ in range(sizes.parallel_rounds):
            before = agent.cpu_seconds()
            agent_seconds += client.pipelined(agent.tcp_port, sizes.parallel_connections, tasks,
                                              sizes.parallel_window)
            cpu += agent.cpu_seconds() - before
            base_rates.append(baseline.parallel_spawn_rate(
                2, sizes.baseline_seconds / sizes.parallel_rounds))
    rate = tasks * sizes.parallel_rounds / agent_seconds
    base_rate = statistics.mean(base_rates)
    ratio = rate / base_rate
    return [Row(f"parallel throughput ({sizes.parallel_connections} conns, --parallel 0)",
                f"{rate:.0f} tasks/s", f"{base_rate:.0f} tasks/s", f"{ratio:.2f}x", ">= 0.8x",
                ratio >= 0.8,
                {"agent_tasks_per_s": rate, "baseline_tasks_per_s": base_rate, "ratio": ratio,
                 "agent_cpu_ms_per_task": cpu / (tasks * sizes.parallel_rounds) * 1000,
                 "window_per_connection": sizes.parallel_window})]


def concurrency(sizes: Sizes) -> list[Row]:
    """N tasks of `sleep S` at once: wall time against S, and the agent's peak RSS."""
    n, s = sizes.concurrent_tasks, sizes.sleep_seconds
    request = json.dumps({"command": ["sleep", str(s)]}).encode() + b"\n"
    with Agent("--parallel", "0") as agent:
        idle, _ = agent.rss()
        wall = client.all_at_once(agent.tcp_port, [request] * n, connections=10)
        _, peak = agent.rss()
    wall_limit = 2.0 * s
    return [
        Row(f"concurrency wall ({n} x sleep {s:g})", f"{wall:.2f} s", f"{s:.2f} s",
            f"{wall / s:.2f}x", f"<= {wall_limit:.1f} s", wall <= wall_limit,
            {"wall_s": wall, "sleep_s": s, "tasks": n}),
        Row(f"concurrency agent peak RSS ({n} tasks)", f"{peak / MIB:.0f} MiB",
            f"idle {idle / MIB:.0f} MiB", "-", "<= 200 MiB", peak <= 200 * MIB,
            {"peak_rss_mib": peak / MIB, "idle_rss_mib": idle / MIB}),
    ]


def large_output(sizes: Sizes) -> list[Row]:
    """One task writing N MiB to stdout, to a client that parses the result line, against
    the same producer writing into a loopback TCP socket read to the end (the floor).

    Agent and floor take turns, so a slow patch of the machine weighs on both.
    """
    size = sizes.output_mib * MIB
    request = output_request(size)
    heap_kept = client.keep_heap()
    buffer = bytearray(size + MIB)
    baseline.socket_floor_seconds(size, buffer)  # fault the buffer in, warm the page cache
    floor, runs = [], []
    with Agent() as agent:
        idle, _ = agent.rss()
        for _ in range(max(3, sizes.output_runs)):
            runs.append(client.one_big_result(agent.tcp_port, request, size))
            floor.append(baseline.socket_floor_seconds(size, buffer))
        _, peak = agent.rss()
    seconds = statistics.median(total for total, _ in runs)
    parse = statistics.median(parse for _, parse in runs)
    base = statistics.median(floor)
    rate, base_rate = sizes.output_mib / seconds, sizes.output_mib / base
    ratio = rate / base_rate
    growth = peak - idle
    limit = 2.5 * size + 60 * MIB
    return [
        Row(f"large output throughput ({sizes.output_mib} MiB)", f"{rate:.0f} MiB/s",
            f"{base_rate:.0f} MiB/s (socket)", f"{ratio:.2f}x", ">= 0.25x", ratio >= 0.25,
            {"agent_mib_per_s": rate, "baseline_mib_per_s": base_rate, "ratio": ratio,
             "agent_seconds": seconds, "client_parse_seconds": parse,
             "baseline_seconds": base, "client_keeps_heap": heap_kept}),
        Row(f"large output agent RSS growth ({sizes.output_mib} MiB)", f"{growth / MIB:.0f} MiB",
            f"idle {idle / MIB:.0f} MiB", f"{growth / size:.2f}x output",
            f"<= {limit / MIB:.0f} MiB", growth <= limit,
            {"rss_growth_mib": growth / MIB, "idle_rss_mib": idle / MIB,
             "peak_rss_mib": peak / MIB}),
    ]


def output_request(size: int) -> bytes:
    """The large-output task: the floor's own producer (bench.baseline.producer_argv)."""
    return json.dumps({"command": baseline.producer_argv(size)}).encode() + b"\n"


def startup(sizes: Sizes) -> list[Row]:
    """`twistd -n agent` launched to its 'listening' log line (the socket is bound by then)."""
    times = []
    for _ in range(sizes.startup_runs):
        with Agent() as agent:
            times.append(agent.listening_after)
            client.serial_round_trips(agent.tcp_port, 1)  # it really answers
    seconds = statistics.median(times)
    return [Row("start-up (twistd -n agent to listening)", f"{seconds * 1000:.0f} ms", "-", "-",
                "< 1 s", seconds < 1.0, {"seconds": seconds, "runs": times})]


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]
