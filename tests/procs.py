"""Read /proc to prove that no process a test started is left behind."""
from __future__ import annotations

import os
import time


def _stat_fields(pid: str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def processes_where(field: int, value: int, include_zombies: bool = False) -> list[int]:
    """PIDs whose /proc stat field (0 = state, 2 = pgrp, 3 = session) equals value."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fields = _stat_fields(pid)
        if fields and int(fields[field]) == value and (include_zombies or fields[0] != "Z"):
            found.append(int(pid))
    return found


def session_members(sid: int) -> list[int]:
    return processes_where(3, sid)


def group_members(pgid: int) -> list[int]:
    return processes_where(2, pgid)


def wait_until_empty(members, ident: int, timeout: float = 5.0) -> list[int]:
    """Poll until no live process matches; return the survivors (empty = clean)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = members(ident)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)
