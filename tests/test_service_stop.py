"""Stopping the agent: tasks get SIGTERM and the grace, and the stop never hangs on one."""
from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from agent.runner.process import CLEANUP_DEADLINE
from agent.service import AgentService


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
