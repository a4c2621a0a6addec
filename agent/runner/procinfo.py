"""What /proc says about a process, and killing a task group left behind by a dead agent.

A PID alone does not name a process for long: once it exits, the number can
be given to an unrelated one. Each task's start time (field 22 of
/proc/PID/stat, clock ticks since boot) and session are recorded when it
starts, so a later agent kills a group only when it is still that task's.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcStat:
    pid: int
    pgrp: int
    session: int
    start_time: int
    zombie: bool
    ppid: int = 0


def proc_stat(pid: int) -> ProcStat | None:
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # the command name (field 2) may hold spaces and parentheses: split after its last ")"
    fields = raw[raw.rindex(b")") + 2:].split()
    return ProcStat(pid, int(fields[2]), int(fields[3]), int(fields[19]), fields[0] == b"Z",
                    ppid=int(fields[1]))


def all_processes() -> list[ProcStat]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None:
                found.append(stat)
    return found


def is_still_the_task(members: list[ProcStat], pgid: int, start_time: int, session: int) -> bool:
    """Whether the live members of group pgid are what is left of the task recorded so.

    With its leader alive, the leader's start time must match. With the leader
    gone, every member must be in the task's session and have started no
    earlier than the task did (a group's members are its leader's
    descendants); the kernel does not reuse a group's number while it has
    members, so this only fails to tell apart an unrelated group in the same
    session whose leader reused the number and already exited.
    """
    alive = [m for m in members if not m.zombie]
    if not alive:
        return False
    leader = next((m for m in members if m.pid == pgid), None)
    if leader is not None:
        return leader.start_time == start_time and leader.session == session
    return all(m.session == session and m.start_time >= start_time for m in alive)


def kill_left_behind(groups: list[tuple[int, int, int]], processes: list[ProcStat] | None = None,
                     killpg=os.killpg) -> list[int]:
    """SIGKILL each (pgid, start_time, session) group that is still that task's; return those killed."""
    if not groups:
        return []
    processes = all_processes() if processes is None else processes
    killed = []
    for pgid, start_time, session in groups:
        members = [p for p in processes if p.pgrp == pgid]
        if is_still_the_task(members, pgid, start_time, session):
            try:
                killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue
            killed.append(pgid)
    return killed
