"""A bounded load test: many connections pipelining many tasks, nothing lost or leaked."""
from __future__ import annotations

import os
import threading
import time

from tests.procs import processes_where, wait_until_empty

CONNECTIONS, TASKS = 50, 200


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _children(pid: int) -> list[int]:
    return processes_where(1, pid)  # field 1 = ppid


def _client(agent, prefix: str, seen: dict, errors: list) -> None:
    try:
        client = agent.connect(timeout=120)
        client.send(*({"command": ["true"], "id": f"{prefix}-{n}"} for n in range(TASKS)))
        for result in client.receive_many(TASKS):
            if result["exit_code"] != 0 or result.get("replayed"):
                errors.append(result)
            seen[result["id"]] = seen.get(result["id"], 0) + 1
        client.close()
    except Exception as e:  # surfaced by the assertions below
        errors.append(repr(e))


def _round(agent, name: str) -> None:
    """Ids are new each round: a known id would be replayed, not run."""
    seen: dict[str, int] = {}
    errors: list = []
    threads = [threading.Thread(target=_client, args=(agent, f"{name}-{i}", seen, errors))
               for i in range(CONNECTIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert errors == []
    assert len(seen) == CONNECTIONS * TASKS and set(seen.values()) == {1}


def test_fifty_connections_of_two_hundred_tasks_each(start_agent):
    """Two rounds: the first sets CPython's high-water mark (10,000 tasks in
    flight at once), the second proves nothing grows per task."""
    agent = start_agent("--parallel", "0")
    pid = agent.proc.pid
    warm = agent.connect()  # the first task opens the /dev/null every child's stdin shares
    warm.send({"command": ["true"]})
    warm.receive()
    warm.close()
    # 11 for the reactor and the door, 4 for the history (lock, database, its -wal and -shm)
    assert _settles(lambda: _fd_count(pid) <= 15)
    fds_idle, rss_idle = _fd_count(pid), _rss_kib(pid)

    _round(agent, "first")
    assert not wait_until_empty(_children, pid), "every task process is reaped"
    assert _settles(lambda: _fd_count(pid) <= fds_idle), (
        f"descriptors: {fds_idle} idle, {_fd_count(pid)} after")
    rss_first = _rss_kib(pid)
    assert rss_first < rss_idle + 96 * 1024, f"RSS {rss_idle} KiB idle, {rss_first} KiB after"

    _round(agent, "second")
    assert not wait_until_empty(_children, pid)
    assert _settles(lambda: _fd_count(pid) <= fds_idle)
    rss_second = _rss_kib(pid)
    print(f"\nload: {fds_idle} fds idle and after; RSS {rss_idle} KiB idle, "
          f"{rss_first} KiB after 10,000 tasks, {rss_second} KiB after 20,000")
    assert rss_second < rss_first + 8 * 1024, (
        f"RSS grew from {rss_first} to {rss_second} KiB over a second round: a per-task leak")


def _settles(check, timeout: float = 5.0) -> bool:
    """Closed connections are noticed by the agent a moment after the client closes."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
