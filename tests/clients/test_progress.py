"""agent-scheduler's progress line: on a terminal only, rewritten in place, never in the results."""
from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys

from twisted.internet.task import Clock

from agent.clients.progress import Progress
from agent.clients.scheduler import Summary
from tests.e2e.conftest import start_agent  # noqa: F401 (a real agent for the last test)


def test_the_line_counts_done_ok_failed_retries_rate_and_time_left():
    clock, err = Clock(), io.StringIO()
    progress = Progress(err, 10, clock, enabled=True)
    summary = Summary(ok=3, failed=1, retried=2)
    clock.advance(2)
    progress.update(summary)
    assert err.getvalue() == "\r\x1b[K4/10 done: 3 ok, 1 failed, 2 busy retried, 2.0 tasks/s, 3 s left"


def test_redraws_are_at_most_five_a_second_and_clear_takes_the_line_away():
    clock, err = Clock(), io.StringIO()
    progress = Progress(err, 100, clock, enabled=True)
    summary = Summary()
    for _ in range(10):
        summary.ok += 1
        clock.advance(0.05)
        progress.update(summary)
    assert err.getvalue().count("\r\x1b[K") == 3  # at 0.05 s, 0.25 s and 0.45 s
    progress.clear()
    assert err.getvalue().endswith("\r\x1b[K")
    progress.clear()  # nothing drawn since: nothing written
    assert err.getvalue().count("\r\x1b[K") == 4


def test_nothing_is_drawn_when_stderr_is_not_a_terminal():
    err = io.StringIO()
    progress = Progress(err, 5, Clock())
    assert progress.enabled is False
    progress.update(Summary(ok=5), force=True)
    progress.clear()
    assert err.getvalue() == ""


def test_a_real_batch_on_a_terminal_shows_the_line_and_ends_with_the_summary(start_agent):
    agent = start_agent("--parallel", "0")
    requests = "".join(json.dumps({"command": ["sleep", "0.05"]}) + "\n" for _ in range(30))
    primary, secondary = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "agent.clients.scheduler", "--agent",
             f"127.0.0.1:{agent.tcp_port}"], input=requests.encode(), stdout=subprocess.PIPE,
            stderr=secondary, timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                os.path.abspath(__file__)))))
        os.close(secondary)
        secondary = None
        shown = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if secondary is not None:
            os.close(secondary)
        os.close(primary)
    assert done.returncode == 0
    assert b"\r\x1b[K" not in done.stdout and done.stdout.count(b"\n") == 30
    text = shown.decode()
    assert "/30 done:" in text and "tasks/s" in text
    assert text.rstrip().splitlines()[-1].split("\x1b[K")[-1].startswith("agent-scheduler: 30 sent")
