"""The HTTP cases: endless output, follow latency, history.

They need the HTTP door (`--http`); on a checkout without it they report
"skipped" instead of failing, so the suite runs on every branch.
"""
from __future__ import annotations

import functools

from bench.agentproc import agent_help
from bench.table import Row, skipped

NOT_AVAILABLE = "HTTP API not available"


@functools.cache
def http_available() -> bool:
    return "--http" in agent_help()


def endless_output(sizes) -> list[Row]:
    if not http_available():
        return [skipped("endless output (HTTP, 1 GiB, follower)", NOT_AVAILABLE, "< 50 MiB growth")]
    raise NotImplementedError


def follow_latency(sizes) -> list[Row]:
    if not http_available():
        return [skipped("follow latency (HTTP)", NOT_AVAILABLE, "p99 < 20 ms")]
    raise NotImplementedError


def history(sizes) -> list[Row]:
    if not http_available():
        return [skipped("history (GET /tasks?limit=100, 100k tasks)", NOT_AVAILABLE, "p50 < 20 ms")]
    raise NotImplementedError
