"""The engine's rules: lanes reject or queue FIFO, cancel, shutdown, observers."""
from __future__ import annotations

import pytest
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from agent.core.decisions import (Attached, Busy, HistoryDown, KeyConflict, KeyForgotten, Replay,
                                  ShuttingDown, Started)
from agent.core.engine import Engine, new_task_id
from agent.core.lanes import Lane
from agent.core.outcome import Ending
from agent.core.request import TaskRequest
from agent.runner.process import start_task
from tests.fakes import (FakeHost, FakeProcessTransport, MemoryHistory, StdoutCollector,
                         exit_with)


class EngineTests(SynchronousTestCase):
    def setUp(self, log_tasks="all"):
        self.seen: list[tuple[str, str]] = []
        self.history = MemoryHistory()
        host = FakeHost(self.history, log_tasks=log_tasks,
                        observers=[lambda t: self.seen.append((t.request.command[0], t.state))])
        self.clock, self.spawn, self.kills, self.engine = host.clock, host.spawn, host.kills, host.engine

    def submit(self, lane, name="cmd", timeout=None):
        return self.engine.submit(TaskRequest((name,), timeout), lane, StdoutCollector())

    def test_rejecting_lane_refuses_while_full_and_frees_on_exit(self):
        lane = Lane(1)
        first = self.submit(lane)
        self.assertRaises(Busy, self.submit, lane)
        exit_with(self.spawn.protocol(), 0)
        self.assertEqual(self.successResultOf(first.ended()).exit_code, 0)
        self.submit(lane)
        self.assertEqual(len(self.spawn.spawned), 2)

    def test_lane_is_freed_by_a_start_failure(self):
        lane = Lane(1)
        self.spawn.fail_with = FileNotFoundError(2, "No such file or directory")
        failed = self.submit(lane)
        self.assertEqual(self.successResultOf(failed.ended()).ending, Ending.START_FAILED)
        self.spawn.fail_with = None
        self.submit(lane)
        self.assertEqual(lane.running, 1)

    def test_lane_is_freed_by_a_timeout(self):
        lane = Lane(1)
        self.submit(lane, timeout=1)
        self.clock.advance(1)
        self.assertEqual(lane.running, 0)

    def test_queueing_lane_starts_waiters_in_arrival_order(self):
        lane = Lane(1, queue=True)
        tasks = [self.submit(lane, name) for name in ("a", "b", "c")]
        self.assertEqual([argv[0] for argv, _ in self.spawn.spawned], ["a"])
        self.assertEqual([t.state for t in tasks], ["running", "queued", "queued"])
        exit_with(self.spawn.protocol(0))
        exit_with(self.spawn.protocol(1))
        self.assertEqual([argv[0] for argv, _ in self.spawn.spawned], ["a", "b", "c"])

    def test_a_full_queue_refuses_at_once_and_takes_again_once_one_starts(self):
        lane = Lane(1, queue=True, max_waiting=2)
        self.submit(lane, "a")
        waiting = [self.submit(lane, name) for name in ("b", "c")]
        self.assertEqual(lane.waiting, 2)
        self.assertRaises(Busy, self.submit, lane, "d")
        self.assertEqual(set(self.engine.live.values()) & set(waiting), set(waiting))
        exit_with(self.spawn.protocol(0))  # a ends, b starts: one place in the queue
        self.submit(lane, "e")
        self.assertEqual(lane.waiting, 2)
        waiting[1].cancel("client disconnected")  # a dropped waiter frees its place too
        self.submit(lane, "f")
        self.assertRaises(Busy, self.submit, lane, "g")

    def _logged_tasks(self, log_tasks: str) -> list[str]:
        events = []
        observer = events.append
        globalLogPublisher.addObserver(observer)
        try:
            self.setUp(log_tasks)
            lane = Lane(0)
            self.submit(lane, "ok"), self.submit(lane, "bad"), self.submit(lane, "slow", timeout=1)
            exit_with(self.spawn.protocol(0), 0)
            exit_with(self.spawn.protocol(1), 2)
            self.clock.advance(1)
        finally:
            globalLogPublisher.removeObserver(observer)
        return [e["argv0"] for e in events if e.get("log_namespace") == "agent.core.engine"
                and "argv0" in e]

    def test_log_tasks_chooses_which_ended_tasks_get_a_line(self):
        self.assertEqual(self._logged_tasks("all"), ["ok", "bad", "slow"])

    def test_log_tasks_failures_leaves_out_exit_code_zero(self):
        self.assertEqual(self._logged_tasks("failures"), ["bad", "slow"])

    def test_log_tasks_none_logs_no_task(self):
        self.assertEqual(self._logged_tasks("none"), [])

    def test_once_shutting_down_nothing_new_starts_but_known_ids_are_answered(self):
        lane = Lane(0)
        running = self.engine.submit(TaskRequest(("a",), None, "known"), lane, StdoutCollector())
        self.engine.cancel_all("agent shutting down", grace=5)
        self.assertRaises(ShuttingDown, self.submit, lane, "new")
        known = self.successResultOf(self.engine.admit(TaskRequest(("a",), None, "known"), lane,
                                                       StdoutCollector(), "tcp"))
        self.assertEqual(known, Attached(running))
        self.assertEqual(len(self.spawn.spawned), 1)

    def test_unlimited_lane_never_waits(self):
        lane = Lane(0)
        for _ in range(50):
            self.submit(lane)
        self.assertEqual(len(self.spawn.spawned), 50)

    def test_cancelling_a_queued_task_drops_it_without_starting(self):
        lane = Lane(1, queue=True)
        self.submit(lane, "a")
        queued = self.submit(lane, "b")
        queued.cancel("client disconnected")
        outcome = self.successResultOf(queued.ended())
        self.assertEqual((outcome.ending, outcome.started), (Ending.CANCELLED, False))
        exit_with(self.spawn.protocol(0))
        self.assertEqual(len(self.spawn.spawned), 1, "a dropped task must never start")
        self.assertEqual(lane.running, 0)

    def test_cancel_all_ends_running_and_queued_tasks(self):
        lane = Lane(1, queue=True)
        running, queued = self.submit(lane, "a"), self.submit(lane, "b")
        self.engine.cancel_all("agent shutting down")
        self.assertEqual(self.successResultOf(running.ended()).error, "agent shutting down")
        self.assertEqual(self.successResultOf(queued.ended()).ending, Ending.CANCELLED)
        self.assertEqual(self.engine.live, {})
        self.assertEqual(len(self.spawn.spawned), 1)

    def test_registry_holds_only_live_tasks(self):
        lane = Lane(0)
        t = self.submit(lane)
        self.assertIn(t.id, self.engine.live)
        exit_with(self.spawn.protocol())
        self.assertNotIn(t.id, self.engine.live)

    def test_observers_see_each_state_change(self):
        lane = Lane(1, queue=True)
        self.submit(lane, "a")
        self.submit(lane, "b")
        exit_with(self.spawn.protocol(0))
        self.assertEqual(self.seen, [("a", "queued"), ("a", "running"), ("b", "queued"),
                                     ("a", "finished"), ("b", "running")])

    def test_a_task_is_running_news_only_once_its_child_has_a_pid(self):
        """A busy agent starts children on its spawn thread (agent.runner.spawner):
        observers (the history, which records the pid to kill the group after a
        crash) hear of a running task when it has one, and never of one that could
        not start."""
        starting = []  # unlike the FakeSpawner, this one starts nothing at once
        self.engine = Engine(self.clock, self.history, observers=[
            lambda t: self.seen.append((t.request.command[0], t.state))],
            start=lambda reactor, argv, sink, **kw: start_task(
                reactor, argv, sink, spawn=lambda r, protocol, *a, **k: starting.append(protocol),
                killpg=self.kills, group_alive=self.kills.group_alive, **kw))
        task, failed = self.submit(Lane(0), "a"), self.submit(Lane(0), "b")
        self.assertEqual(self.seen, [("a", "queued"), ("b", "queued")])
        self.assertEqual((task.state, task.runner.pid), ("running", None))
        starting[0].makeConnection(FakeProcessTransport(77))
        starting[1].start_failed(FileNotFoundError(2, "No such file or directory"))
        self.assertEqual(self.seen, [("a", "queued"), ("b", "queued"), ("a", "running"),
                                     ("b", "finished")])
        self.assertEqual(failed.outcome.ending, Ending.START_FAILED)

    def test_cleanup_is_news_of_its_own_after_the_end(self):
        task = self.submit(Lane(0), "a")
        exit_with(self.spawn.protocol(0))
        self.assertEqual(self.history.cleanups, [(task.id, "complete")])
        self.assertEqual(self.seen[-1], ("a", "finished"))

    def test_cleanup_is_recorded_and_a_surviving_group_reported(self):
        lane = Lane(0)
        clean, stuck = self.submit(lane, "a"), self.submit(lane, "b")
        self.kills.survivors.add(stuck.runner.pid)
        exit_with(clean.runner)
        exit_with(stuck.runner)
        self.assertEqual(clean.cleanup, "complete")
        self.assertIsNone(stuck.cleanup)
        self.clock.pump([0.05] * 200)
        self.assertEqual(stuck.cleanup, "incomplete")
        self.assertGreater(self.kills.calls.count((stuck.runner.pid, 9)), 10,
                           "a surviving group is SIGKILLed again and again until the deadline")

    def test_the_history_gets_every_chunk_the_door_sink_gets(self):
        tapped = StdoutCollector()
        self.history.tap = lambda t: tapped
        t = self.submit(Lane(0))
        self.spawn.protocol().childDataReceived(1, b"out")
        self.spawn.protocol().childDataReceived(2, b"err")
        exit_with(self.spawn.protocol())
        self.assertEqual((t.sink.text(), tapped.text()), ("out", "out"))
        self.assertEqual(tapped.sizes, {1: 3, 2: 3})

    def test_a_queued_task_dropped_before_it_starts_is_never_tapped(self):
        asked = []
        self.history.tap = lambda t: asked.append(t.id) or StdoutCollector()
        lane = Lane(1, queue=True)
        running = self.submit(lane, "a")
        self.submit(lane, "b").cancel()
        self.assertEqual(asked, [running.id])



    def test_cleanup_is_known_for_a_task_dropped_from_the_queue(self):
        lane = Lane(1, queue=True)
        self.submit(lane)
        queued = self.submit(lane)
        queued.cancel()
        self.assertIs(self.successResultOf(queued.cleaned()), queued)
        self.assertEqual(queued.cleanup, "complete")

    def test_cleaned_fires_once_the_group_is_verified_empty(self):
        task = self.submit(Lane(0))
        waiting = task.cleaned()
        self.kills.survivors.add(task.runner.pid)
        exit_with(self.spawn.protocol())
        self.assertNoResult(waiting)
        self.kills.survivors.clear()
        self.clock.advance(0.05)
        self.assertEqual(self.successResultOf(waiting).cleanup, "complete")

class AdmissionTests(SynchronousTestCase):
    """One step, one decision: a request id is an idempotency key, never run twice."""

    def setUp(self):
        self.history = MemoryHistory()
        host = FakeHost(self.history)
        self.spawn, self.engine = host.spawn, host.engine

    def admit(self, key, lane=None, held=False, command=("cmd",), durable=False):
        return self.engine.admit(TaskRequest(command, id=key), lane or Lane(0), StdoutCollector(),
                                 "tcp", held=held, durable=durable)

    def submit(self, key, lane=None, held=False):
        return self.successResultOf(self.admit(key, lane, held)).task

    def test_a_new_request_is_started(self):
        decision = self.successResultOf(self.admit("k"))
        self.assertIsInstance(decision, Started)
        self.assertEqual(decision.task.state, "running")

    def test_a_live_key_attaches_to_the_running_task_even_when_the_lane_is_full(self):
        lane = Lane(1)
        first = self.submit("k", lane)
        self.assertEqual(self.successResultOf(self.admit("k", lane)), Attached(first))
        self.assertEqual(len(self.spawn.spawned), 1)

    def test_an_ended_key_is_a_replay_of_its_record(self):
        first = self.submit("k")
        exit_with(self.spawn.protocol())
        self.assertNotIn("k", self.engine.live_by_key)
        decision = self.successResultOf(self.admit("k"))
        self.assertIsInstance(decision, Replay)
        self.assertEqual((decision.record.id, decision.record.outcome.exit_code), (first.id, 0))
        self.assertEqual(len(self.spawn.spawned), 1)

    def test_a_key_used_for_another_command_is_refused_without_showing_it(self):
        self.submit("k")
        refused = self.failureResultOf(self.admit("k", command=("other",)), KeyConflict)
        self.assertNotIn("cmd", refused.value.message)
        exit_with(self.spawn.protocol())
        self.failureResultOf(self.admit("k", command=("other",)), KeyConflict)
        self.assertEqual(len(self.spawn.spawned), 1)

    def test_a_key_whose_record_went_meanwhile_is_refused_for_a_retry(self):
        first = self.submit("k")
        exit_with(self.spawn.protocol())
        self.history.forget(first.id)
        self.failureResultOf(self.admit("k"), KeyForgotten)

    def test_a_durable_request_is_refused_while_the_history_cannot_be_written(self):
        self.history.writable = False
        self.failureResultOf(self.admit(None, durable=True), HistoryDown)
        self.successResultOf(self.admit(None))  # a TCP task needs no record to be answered
        self.assertEqual(len(self.spawn.spawned), 1)

    def test_refusals_are_decisions_too(self):
        lane = Lane(1)
        self.submit(None, lane)
        self.failureResultOf(self.admit(None, lane), Busy)
        self.engine.cancel_all("agent shutting down")
        self.failureResultOf(self.admit(None, lane), ShuttingDown)

    def test_tasks_without_a_key_never_collide(self):
        self.submit(None)
        self.submit(None)
        self.assertEqual(len(self.spawn.spawned), 2)

    def test_an_attached_holder_keeps_a_held_task_alive(self):
        task = self.submit("k", held=True)
        self.successResultOf(self.admit("k", held=True))
        self.engine.release_many([task], "client disconnected")
        self.assertIsNone(task.outcome)
        self.engine.release_many([task], "client disconnected")
        self.assertEqual(self.successResultOf(task.ended()).error, "client disconnected")

    def test_a_held_task_ends_only_when_its_last_holder_lets_go(self):
        task = self.submit("k", held=True)
        task.hold()  # a retry waits for it too
        self.engine.release_many([task], "client disconnected")
        self.assertIsNone(task.outcome)
        self.engine.release_many([task], "client disconnected")
        self.assertEqual(self.successResultOf(task.ended()).error, "client disconnected")

    def test_a_task_nobody_holds_outlives_any_release(self):
        task = self.submit("k")
        task.hold()
        self.engine.release_many([task], "client disconnected")
        self.assertIsNone(task.outcome)

    def test_each_waiter_gets_the_outcome_whatever_the_others_return(self):
        task = self.submit("k")
        first, second = task.ended(), task.ended()
        first.addCallback(lambda _: None)
        exit_with(self.spawn.protocol(), 3)
        self.assertEqual(self.successResultOf(second).exit_code, 3)
        self.assertEqual(self.successResultOf(task.ended()).exit_code, 3)



def test_a_commands_control_characters_never_reach_the_log_raw():
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        host = FakeHost()
        host.engine.submit(TaskRequest(("evil\n2026-01-01 [agent#info] forged\x1b[2J",)), Lane(0),
                           StdoutCollector())
        exit_with(host.spawn.protocol(), 0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    [line] = [e for e in events if e.get("log_namespace") == "agent.core.engine" and "argv0" in e]
    assert line["argv0"] == "evil\\n2026-01-01 [agent#info] forged\\x1b[2J"


def test_a_queue_is_bounded_in_bytes_too_and_frees_them_as_waiters_start_or_go():
    host = FakeHost()
    lane = Lane(1, queue=True, max_waiting_bytes=2_500)
    submit = lambda size: host.engine.submit(TaskRequest(("x" * size,)), lane, StdoutCollector())
    submit(10)  # runs
    waiting = [submit(1000), submit(1000)]
    assert lane.waiting_bytes == 2000
    with pytest.raises(Busy):
        submit(1000)
    submit(400)  # still fits
    waiting[0].cancel("client disconnected")
    assert lane.waiting_bytes == 1400
    exit_with(host.spawn.protocol(0))  # the first ends: the second waiter starts
    assert lane.waiting_bytes == 400
    submit(1000)


def test_a_task_id_is_32_random_hex_digits_as_the_history_and_the_http_api_expect():
    from agent.history.records import TASK_ID
    ids = {new_task_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(TASK_ID.match(task_id) for task_id in ids)
