"""Stopping the agent: tasks get SIGTERM and the grace, the stop never hangs on one, and the
watchdog guards the tasks from before the doors open until after the tasks have ended."""
from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.logger import globalLogPublisher

from agent.options import Options
from agent.runner.process import CLEANUP_DEADLINE
from agent.runner.watchdog import Watchdog
from agent.service import AgentService, build


class FakeTask:
    def __init__(self, running: bool, cleaned: Deferred):
        self.runner = object() if running else None
        self._cleaned = cleaned

    def cleaned(self) -> Deferred:
        return self._cleaned


class FakeEngine:
    def __init__(self, *tasks):
        self.live = {str(i): task for i, task in enumerate(tasks)}
        self.cancelled: list[tuple[str, float]] = []

    def cancel_all(self, message: str, grace: float = 0.0) -> None:
        self.cancelled.append((message, grace))


def _stop(engine, clock, grace):
    service = AgentService(engine, clock, store=None, shutdown_grace=grace)
    service.startService()
    stopped = []
    service.stopService().addCallback(stopped.append)
    return stopped


def test_every_task_gets_the_grace_and_the_stop_waits_for_their_cleanup():
    clock, pending = Clock(), Deferred()
    engine = FakeEngine(FakeTask(True, pending), FakeTask(False, succeed(None)))
    stopped = _stop(engine, clock, 3.0)
    assert engine.cancelled == [("agent shutting down", 3.0)]
    clock.advance(3.0)
    assert stopped == []  # still waiting for the running task's group
    pending.callback(None)
    assert len(stopped) == 1


def test_a_group_never_verified_empty_does_not_hang_the_stop():
    clock, errors = Clock(), []
    engine = FakeEngine(FakeTask(True, Deferred()))
    observer = lambda event: errors.append(event) if event["log_level"].name == "error" else None  # noqa: E731
    globalLogPublisher.addObserver(observer)
    try:
        stopped = _stop(engine, clock, 2.0)
        clock.advance(2.0 + CLEANUP_DEADLINE)
        assert stopped == []
        clock.advance(1.0)
        assert len(stopped) == 1
    finally:
        globalLogPublisher.removeObserver(observer)
    assert any("not verified empty" in event["log_format"] for event in errors)


def test_with_nothing_running_the_stop_is_immediate():
    stopped = _stop(FakeEngine(), Clock(), 5.0)
    assert len(stopped) == 1


class FakeWatchdog:
    def __init__(self, calls: list[str]):
        self.calls = calls
        self.stopped = Deferred()

    def start(self) -> None:
        self.calls.append("watchdog started")

    def stop(self) -> Deferred:
        self.calls.append("watchdog told bye")
        return self.stopped


class FakeDoor(Service):
    def __init__(self, calls: list[str]):
        self.calls = calls

    def startService(self):
        self.calls.append("door open")
        super().startService()


def test_the_watchdog_starts_before_a_door_and_is_told_bye_after_the_tasks_ended():
    clock, cleaned, calls = Clock(), Deferred(), []
    watchdog = FakeWatchdog(calls)
    service = AgentService(FakeEngine(FakeTask(True, cleaned)), clock, shutdown_grace=1.0,
                           watchdog=watchdog)
    FakeDoor(calls).setServiceParent(service)
    service.startService()
    assert calls == ["watchdog started", "door open"], "no task can start unguarded"
    stopped = []
    service.stopService().addCallback(stopped.append)
    assert "watchdog told bye" not in calls, "while a task's group may still live, it guards it"
    cleaned.callback(None)
    assert calls[-1] == "watchdog told bye"
    assert stopped == []
    watchdog.stopped.callback(None)
    assert len(stopped) == 1


def test_only_the_agents_own_process_gets_a_watchdog(tmp_path):
    options = Options()
    options.parseOptions(["--data-dir", str(tmp_path / "data")])
    assert build(options, MemoryReactor()).watchdog is None
    agent = build(options, MemoryReactor(), own_process=True)
    assert isinstance(agent.watchdog, Watchdog)
    assert agent.watchdog.observe in agent.engine._observers  # noqa: SLF001 - the wiring itself
    assert agent.watchdog.observe_cleanup in agent.engine._cleanup_observers  # noqa: SLF001
