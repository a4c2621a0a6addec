"""Clients that do not read, leave lines unfinished or open too many connections,
against a real agent: its memory stays bounded, and nothing is lost or left behind."""
from __future__ import annotations

import json
import os
import socket
import threading
import time

MIB = 1 << 20
OUTPUT = 40 * MIB
PENDING = 32 * MIB
PARALLEL = 2
SLACK = 48 * MIB
"""Beyond the bound's own terms: the spill thread's 1 MiB batches, pieces in flight in
four transports (64 KiB each), the allocator's free lists. Measured peaks sit ~40 MiB
below the bound; without the bound the same run holds all eight results (~320 MiB more)."""


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Peak:
    """The highest RSS seen, sampled every 20 ms on a thread."""

    def __init__(self, pid: int):
        self.pid, self.value, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.is_set():
            self.value = max(self.value, rss(self.pid))
            self._stop.wait(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.value


def spill_files(pid: int, data_dir) -> list[str]:
    """The agent's open files in its data dir that have no name (spills)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(data_dir)) and target.endswith("(deleted)"):
            found.append(target)
    return found


def big(n: int) -> dict:
    return {"command": ["sh", "-c", f"head -c {OUTPUT} /dev/zero | tr '\\0' {'ab'[n % 2]}"],
            "id": f"big-{n}"}


def test_results_nobody_reads_stay_under_the_bound_and_are_all_delivered_later(
        start_agent, tmp_path):
    agent = start_agent("--parallel", str(PARALLEL), "--when-busy", "queue",
                        "--max-pending-output", str(PENDING), env={"PYTHONMALLOC": "malloc"})
    warm = agent.connect()
    warm.send({"command": ["true"]})
    warm.receive()
    baseline = rss(agent.proc.pid)
    peak = Peak(agent.proc.pid)
    clients = [agent.connect(timeout=120) for _ in range(4)]
    for i, client in enumerate(clients):
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        client.send(big(2 * i), big(2 * i + 1))
    agent.wait_for_log("exited exit_code=0", timeout=120, count=8)
    time.sleep(0.5)  # the last spills land
    held = peak.stop()
    bound = baseline + PARALLEL * OUTPUT + PENDING + SLACK
    print(f"RSS baseline {baseline / MIB:.0f} MiB, peak {held / MIB:.0f} MiB, "
          f"bound {bound / MIB:.0f} MiB")
    assert held < bound
    assert spill_files(agent.proc.pid, tmp_path / "agent-data"), "results over the bound spilled"

    for i, client in enumerate(clients[:2]):  # two clients read everything ...
        results = {r["id"]: r for r in client.receive_many(2)}
        for n in (2 * i, 2 * i + 1):
            assert results[f"big-{n}"]["output"] == "ab"[n % 2] * OUTPUT
    for client in clients[2:]:  # ... and two leave without reading
        client.close()
    deadline = time.monotonic() + 10
    while spill_files(agent.proc.pid, tmp_path / "agent-data") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert spill_files(agent.proc.pid, tmp_path / "agent-data") == []
    after = agent.connect()
    after.send({"command": ["echo", "still here"]})
    assert after.receive()["output"] == "still here\n"


def test_a_stalled_partial_line_and_a_connection_past_the_cap_are_answered_and_closed(
        start_agent):
    agent = start_agent("--max-connections", "3", "--line-timeout", "0.5")
    stalled, waiting, third = agent.connect(), agent.connect(), agent.connect()
    waiting.send({"command": ["sleep", "2"], "id": "long"})
    stalled.sock.sendall(b'{"command": ["tr')
    refused = agent.connect()
    assert refused.receive() == {"command": None, "exit_code": -1,
                                 "error": "too many connections (--max-connections 3)"}
    assert refused.reader.readline() == b""
    started = time.monotonic()
    line = stalled.receive()
    assert 0.4 < time.monotonic() - started < 5
    assert line["exit_code"] == -1 and "--line-timeout" in line["error"]
    assert stalled.reader.readline() == b""
    assert waiting.receive()["id"] == "long", "no partial line: it waits as long as its task"
    deadline = time.monotonic() + 5
    while True:  # the stalled connection's slot is free again once the agent has closed it
        late = agent.connect()
        late.send({"command": ["echo", "in"]})
        result = late.receive()
        if result.get("output") == "in\n" or time.monotonic() > deadline:
            break
    assert result["output"] == "in\n"
    assert json.dumps(result)
