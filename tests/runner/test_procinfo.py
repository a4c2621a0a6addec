"""The PID-reuse guard: a group left behind is ended only while it is still the recorded task's."""
from __future__ import annotations

from agent.runner.procinfo import ProcStat, is_still_the_task


def _stat(pid, pgrp, start, session=7, zombie=False):
    return ProcStat(pid, pgrp, session, start, zombie)


def test_pid_reuse_guard_with_the_leader_alive():
    assert is_still_the_task([_stat(10, 10, 500)], 10, 500, 7)
    assert not is_still_the_task([_stat(10, 10, 900)], 10, 500, 7)
    assert not is_still_the_task([_stat(10, 10, 500, session=8)], 10, 500, 7)


def test_pid_reuse_guard_with_only_descendants_left():
    assert is_still_the_task([_stat(11, 10, 600), _stat(12, 10, 700)], 10, 500, 7)
    assert not is_still_the_task([_stat(11, 10, 400)], 10, 500, 7)
    assert not is_still_the_task([_stat(11, 10, 600, session=9)], 10, 500, 7)
    assert not is_still_the_task([], 10, 500, 7)
