"""What the agent does with children that are not its tasks: reap, wait, kill."""
from __future__ import annotations

from twisted.internet.task import Clock

from agent.runner.escapees import INTERVAL, EscapeeReaper
from agent.runner.procinfo import ProcStat

AGENT = 100


class World:
    """The agent's children as /proc would show them, and what was done to them."""

    def __init__(self):
        self.clock = Clock()
        self.live_tasks = {"task-a": object()}
        self.stats: dict[int, ProcStat] = {}
        self.task_pids = {101}
        self.below: dict[int, list[int]] = {}
        self.killed, self.reaped = [], []
        self.refuse = set()
        self.subreaper_calls = []
        self.reaper = EscapeeReaper(
            self.clock, self.live_tasks.keys, own_pid=AGENT,
            children=lambda pid: [101, *self.stats], stat=self.stats.get,
            descendants=lambda pid: self.below.get(pid, []), kill=self._kill,
            reap=self.reaped.append, is_task=self.task_pids.__contains__,
            subreaper=self._subreaper)

    def _kill(self, pid):
        self.killed.append(pid)
        return pid not in self.refuse

    def _subreaper(self, on):
        self.subreaper_calls.append(on)
        return True

    def child(self, pid, start=1, zombie=False):
        self.stats[pid] = ProcStat(pid, pid, pid, start, zombie, ppid=AGENT)

    def look(self, times=1):
        for _ in range(times):
            self.clock.advance(INTERVAL)


def test_an_escapee_lives_while_a_task_live_at_its_adoption_runs_and_dies_after():
    world = World()
    world.reaper.start()
    world.child(200)
    world.below[200] = [201, 202]
    world.look(5)
    assert world.killed == []
    del world.live_tasks["task-a"]
    world.live_tasks["task-b"] = object()  # a task started later does not keep it alive
    world.look()
    assert world.killed == [200, 201, 202]


def test_the_agents_own_tasks_are_never_touched():
    world = World()
    world.reaper.start()
    world.live_tasks.clear()
    world.look(3)
    assert world.killed == [] and world.reaped == []


def test_a_zombie_is_reaped_at_once():
    world = World()
    world.reaper.start()
    world.child(300, zombie=True)
    world.look()
    assert world.reaped == [300] and world.killed == []


def test_a_reused_pid_is_a_new_process_and_waits_again():
    world = World()
    world.reaper.start()
    world.child(200, start=1)
    world.look()
    world.child(200, start=99)  # the first one exited; an unrelated one got its number
    world.live_tasks.clear()
    world.look()
    assert world.killed == [], "seen for the first time: the tasks live now are its candidates"
    world.look()
    assert world.killed == [200]


def test_stopping_kills_every_escapee_at_once_and_gives_up_being_a_subreaper():
    world = World()
    world.reaper.start()
    world.child(200)
    world.look()
    world.child(201)  # never looked at before the stop
    world.reaper.stop()
    assert sorted(world.killed) == [200, 201]
    assert world.subreaper_calls == [True, False]
    assert world.clock.getDelayedCalls() == []


def test_a_process_it_may_not_kill_is_logged_once_and_the_looking_goes_on(monkeypatch):
    from agent.runner import escapees
    logged = []
    monkeypatch.setattr(escapees.log, "warn", lambda *a, **kw: logged.append(kw))
    world = World()
    world.reaper.start()
    world.child(200)
    world.refuse.add(200)
    world.live_tasks.clear()
    world.look(5)
    assert world.killed == [200, 200, 200, 200], "signalled again at each look"
    assert len(logged) == 1 and "200" in logged[0]["refused"]
    world.child(300, zombie=True)
    world.look()
    assert world.reaped == [300]


def test_without_a_subreaper_nothing_is_looked_at():
    world = World()
    world.reaper._subreaper = lambda on: False
    world.reaper.start()
    world.child(200)
    world.live_tasks.clear()
    world.look(3)
    assert world.killed == [] and world.clock.getDelayedCalls() == []


def test_an_error_in_one_look_does_not_end_the_looking():
    world = World()
    world.reaper.start()
    calls = []

    def broken(pid):
        calls.append(pid)
        if len(calls) == 1:
            raise OSError("proc went away")
        return [101]
    world.reaper._children = broken
    world.look(2)
    assert len(calls) == 2


def test_without_a_way_to_list_children_the_agent_does_not_adopt_any():
    """Adopted orphans it could never find would end as zombies piling up in the agent."""
    from agent.runner import escapees
    calls = []
    reaper = EscapeeReaper(Clock(), dict().keys, own_pid=999999999,
                           subreaper=lambda on: calls.append(on) or True)
    assert reaper._children is escapees.children_of
    reaper.start()
    assert calls == []


def test_a_child_the_spawn_thread_registers_during_the_look_is_not_reaped(monkeypatch):
    """The look decides a zombie is no task, then reads /proc, during which the spawn
    thread may record it as a child it has just started: reaping it then would steal
    its exit status from the runner (it did: exit code 255, error "")."""
    import os
    import time

    from agent.runner import escapees, procinfo, spawner as spawner_module

    pid = os.posix_spawnp("true", ["true"], os.environ)
    while procinfo.proc_stat(pid) is None or not procinfo.proc_stat(pid).zombie:
        time.sleep(0.01)
    thread = spawner_module.Spawner(reactor=None)
    monkeypatch.setitem(spawner_module._spawners, -1, thread)

    def stat_while_the_thread_records_it(child):
        thread.unknown.add(child)  # what the spawn thread does once its call returns
        return procinfo.proc_stat(child)

    reaper = EscapeeReaper(Clock(), lambda: (), own_pid=os.getpid(),
                           children=lambda own: [pid], stat=stat_while_the_thread_records_it,
                           is_task=lambda child: False)  # as the look saw it, a moment before
    try:
        reaper.sweep()
        assert procinfo.proc_stat(pid).zombie, "left for the runner to reap"
    finally:
        thread.unknown.discard(pid)
        os.waitpid(pid, 0)
    assert escapees._reap is reaper._reap
