"""The bare limits the agent is compared with, measured in the same run.

`python -m bench.baseline spawn-loop N` is the loop run in the parallel
baseline's worker processes: it prints how long N spawns took.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

TRUE = "/bin/true"


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
        count, taken = worker.communicate()[0].split()
        rates.append(int(count) / float(taken))
    return sum(rates)


def cat_seconds(path: str) -> float:
    """Wall seconds of `cat path > /dev/null`, process start included."""
    started = time.perf_counter()
    subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def _repo() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


if __name__ == "__main__":
    if sys.argv[1:2] == ["spawn-loop"]:
        spawn_loop(50)  # warm up the page cache and the allocator
        spawned, took = spawns_for(float(sys.argv[2]))
        print(spawned, took)
