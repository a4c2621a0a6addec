"""agent-scheduler --fleet's submitter on a Clock, against the fleet's store in memory
(tests/clients/fleetfakes.py): submitting in batches, waiting on notifications fetched in
batches, the poll and the reconnect that back them up, the database going away."""
from __future__ import annotations

import io
import json

import psycopg
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from agent.clients import fleet_submit
from agent.clients.batch import numbered_requests
from agent.clients.fleet_submit import (FETCH_BATCH, FETCH_DELAY, POLL, SUBMIT_BATCH, Entry,
                                        FleetInputError, FleetUnreachable, Submitter,
                                        entries_from)
from agent.fleet.records import Submission
from agent.fleet.tasks import ENDED
from tests.clients.fleetfakes import FakeFleet, FakeListener


def entries(*keys, command=("true",)) -> list[Entry]:
    return [Entry(f"line {i}", Submission(key, tuple(command)))
            for i, key in enumerate(keys, 1)]


class Run:
    """A Submitter on a Clock with a FakeFleet, its output and its listener at hand."""

    def __init__(self, fleet: FakeFleet | None = None):
        self.clock = Clock()
        self.fleet = fleet or FakeFleet()
        self.out = io.BytesIO()
        self.err = io.StringIO()
        self.listener: FakeListener | None = None
        self.submitter = Submitter(self.clock, self.fleet, self._listen, submitted_by="test",
                                   where="host=db", out=self.out, err=self.err)

    def _listen(self, received, reconnected):
        self.listener = FakeListener(received, reconnected)
        return self.listener

    def start(self, batch) -> Deferred:
        return Deferred.fromCoroutine(self.submitter.run(batch))

    def notify(self, *keys) -> None:
        for key in keys:
            self.listener.received(ENDED, key)

    def finish(self, *keys, notify=True, **fields) -> None:
        for key in keys:
            self.fleet.finish(key, **fields)
        if notify:
            self.notify(*keys)

    def results(self) -> list[dict]:
        return [json.loads(line) for line in self.out.getvalue().splitlines()]


# -- the input


def test_every_request_is_checked_before_any_is_submitted_and_the_error_names_its_line():
    numbered = numbered_requests('{"command": ["a"]}\n\n{"command": []}\n')
    with pytest.raises(FleetInputError, match=r'^line 3: "command" must be a non-empty array'):
        entries_from(numbered)


def test_the_fleets_own_fields_are_read_and_unknown_ones_refused():
    [entry] = entries_from([("line 1", {"id": "k", "command": ["a"], "labels": {"os": "linux"},
                                        "max_attempts": 5, "timeout": 1500})], 0.001)
    assert entry.submission == Submission("k", ("a",), 1.5, (), (("os", "linux"),), 5)
    with pytest.raises(FleetInputError, match="line 2: unknown field"):
        entries_from([("line 2", {"command": ["a"], "colour": "red"})])


def test_a_request_without_id_gets_a_key_of_its_own():
    first, second = entries_from([("line 1", {"command": ["a"]})] * 2)
    assert first.submission.key.startswith("fleet-") and first.submission.key != \
        second.submission.key


# -- submitting


def test_a_large_batch_is_submitted_a_few_hundred_tasks_per_transaction():
    run = Run()
    run.start(entries(*(f"k{i}" for i in range(2 * SUBMIT_BATCH + 7))))
    sizes = [len(batch) for batch, _ in run.fleet.calls_of("submit_many")]
    assert sizes == [SUBMIT_BATCH, SUBMIT_BATCH, 7]
    assert run.submitter.summary.sent == 2 * SUBMIT_BATCH + 7


def test_the_listener_starts_before_anything_is_submitted():
    run = Run(FakeFleet(hold=True))
    run.start(entries("a"))
    assert run.listener.started and run.fleet.calls == [("prepare_schema", ())]


def test_a_database_unreachable_at_the_start_ends_the_run_with_nothing_submitted():
    run = Run()
    run.fleet.down = "connection refused"
    d = run.start(entries("a"))
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(FleetUnreachable)
    assert "cannot reach the fleet database host=db: connection refused" in str(failure.value)
    assert run.fleet.calls_of("submit_many") == [] and run.listener.stopped


# -- waiting


def test_results_print_in_the_order_their_tasks_end():
    run = Run()
    d = run.start(entries("a", "b", "c"))
    run.finish("b", stdout=b"bee\n")
    run.clock.advance(FETCH_DELAY)
    run.finish("c", exit_code=3)
    run.finish("a", exit_code=-1, error="timeout exceeded")
    run.clock.advance(FETCH_DELAY)
    assert [(r["id"], r["exit_code"]) for r in run.results()] == [("b", 0), ("a", -1), ("c", 3)]
    assert run.results()[0]["output"] == "bee\n"
    assert d.called and d.result is None
    summary = run.submitter.summary
    assert (summary.sent, summary.ok, summary.failed, summary.timed_out, summary.missing) == (
        3, 1, 1, 1, 0)
    assert run.listener.stopped


def test_notifications_are_fetched_in_batches_not_one_query_each():
    run = Run(FakeFleet(hold=True))
    keys = [f"k{i}" for i in range(2 * FETCH_BATCH + 50)]
    d = run.start(entries(*keys))
    run.fleet.answer()  # schema, submit, the first look (nothing ended yet)
    run.finish(*keys)
    for _ in range(3):
        run.clock.advance(FETCH_DELAY)
        run.fleet.answer()
    assert [len(keys) for (keys,) in run.fleet.calls_of("ended")] == [
        FETCH_BATCH, FETCH_BATCH, 50]
    assert len(run.results()) == len(keys) and d.called


def test_notifications_a_few_milliseconds_apart_share_one_query():
    run = Run()
    keys = [f"k{i}" for i in range(5)]
    d = run.start(entries(*keys))
    for key in keys:
        run.finish(key)
        run.clock.advance(FETCH_DELAY / 10)
    run.clock.advance(FETCH_DELAY)
    assert run.fleet.calls_of("ended") == [(keys,)] and d.called


def test_a_notification_of_another_submitters_task_is_ignored():
    run = Run()
    run.start(entries("mine"))
    run.notify("theirs")
    run.clock.advance(FETCH_DELAY)
    assert run.fleet.calls_of("ended") == []


def test_the_poll_finds_a_result_whose_notification_never_came():
    run = Run()
    d = run.start(entries("a"))
    run.finish("a", notify=False)
    run.clock.advance(POLL - 0.1)
    assert run.results() == []
    run.clock.advance(0.1)
    run.clock.advance(FETCH_DELAY)
    assert [r["id"] for r in run.results()] == ["a"] and d.called


def test_each_look_asks_for_keys_only_in_batches():
    run = Run()
    run.start(entries(*(f"k{i}" for i in range(fleet_submit.CHECK_BATCH + 1))))
    run.clock.advance(POLL)
    sizes = [len(keys) for (keys,) in run.fleet.calls_of("ended_keys")]
    assert sizes == [fleet_submit.CHECK_BATCH, 1] * 2


def test_a_listener_back_after_a_gap_looks_at_once_for_what_ended_meanwhile():
    run = Run()
    d = run.start(entries("a"))
    run.finish("a", notify=False)
    run.listener.reconnected()
    run.clock.advance(FETCH_DELAY)
    assert [r["id"] for r in run.results()] == ["a"] and d.called
    assert "listening again" in run.err.getvalue()


def test_a_task_that_ended_before_it_was_submitted_again_is_printed_at_once():
    run = Run()
    run.fleet.submit_many([Submission("old", ("true",))], "someone")
    run.fleet.finish("old", stdout=b"done before\n")
    d = run.start(entries("old"))
    run.clock.advance(FETCH_DELAY)
    assert run.results()[0]["output"] == "done before\n" and d.called
    assert run.submitter.summary.attached == 1
    assert "1 attached to tasks the fleet knew" in run.submitter.summary_line()


def test_the_same_key_twice_in_a_batch_gets_two_result_lines():
    run = Run()
    d = run.start(entries("a", "a"))
    run.finish("a")
    run.clock.advance(FETCH_DELAY)
    assert [r["id"] for r in run.results()] == ["a", "a"] and d.called


def test_a_key_known_with_another_command_is_a_failed_result_and_runs_nothing():
    run = Run()
    run.fleet.submit_many([Submission("k", ("echo", "theirs"))], "someone")
    d = run.start(entries("k", "new", command=("rm", "-rf", "x")))
    assert run.results() == [{"command": ["rm", "-rf", "x"], "exit_code": -1, "id": "k",
                              "error": "key 'k' is already used by another command",
                              "state": "refused"}]
    assert run.fleet.tasks["k"].command == ("echo", "theirs")
    run.finish("new")
    run.clock.advance(FETCH_DELAY)
    assert d.called and run.submitter.summary.failed == 1 and run.submitter.summary.ok == 1


def test_nothing_is_asked_of_the_database_after_the_last_result():
    run = Run()
    d = run.start(entries("a"))
    run.finish("a")
    run.clock.advance(FETCH_DELAY)
    assert d.called
    calls = len(run.fleet.calls)
    run.clock.advance(10 * POLL)
    assert len(run.fleet.calls) == calls and not run.clock.getDelayedCalls()


# -- the database going away


def test_calls_are_tried_again_with_back_off_while_the_database_is_away():
    run = Run(FakeFleet(hold=True))
    d = run.start(entries("a"))
    run.fleet.answer()  # schema, submit, first look
    run.fleet.down = "server closed the connection unexpectedly"
    run.finish("a")
    run.clock.advance(FETCH_DELAY)
    run.fleet.answer()
    assert "the fleet database is unreachable (server closed the connection unexpectedly)" \
        in run.err.getvalue()
    tries = [len(run.fleet.calls_of("ended"))]
    for wait in (0.25, 0.5, 1.0):
        run.clock.advance(wait)
        run.fleet.answer()
        tries.append(len(run.fleet.calls_of("ended")))
    assert tries == [1, 2, 3, 4]
    run.fleet.down = None
    run.clock.advance(2.0)
    run.fleet.answer()
    assert [r["id"] for r in run.results()] == ["a"] and d.called
    assert run.err.getvalue().count("unreachable") == 1
    assert "the fleet database is back after" in run.err.getvalue()


def test_a_batch_whose_answer_was_lost_is_submitted_again_and_attaches_to_itself():
    run = Run()
    run.fleet.lose_answer_of = "submit_many"
    d = run.start(entries("a", "b"))
    assert len(run.fleet.calls_of("submit_many")) == 1 and "unreachable" in run.err.getvalue()
    run.clock.advance(fleet_submit.FIRST_RETRY)
    assert len(run.fleet.calls_of("submit_many")) == 2
    run.finish("a", "b")
    run.clock.advance(FETCH_DELAY)
    assert [r["id"] for r in run.results()] == ["a", "b"] and d.called
    assert len(run.fleet.tasks) == 2


def test_an_error_that_is_not_a_lost_connection_ends_the_run():
    run = Run()
    d = run.start(entries("a", "b"))
    run.fleet.broken = psycopg.errors.InsufficientPrivilege("permission denied for table")
    run.finish("a")
    run.clock.advance(FETCH_DELAY)
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(psycopg.errors.InsufficientPrivilege)
    assert run.submitter.summary.missing == 2 and run.listener.stopped
    run.clock.advance(10 * POLL)
    assert not run.clock.getDelayedCalls()


def test_tasks_asking_for_labels_no_node_up_has_are_named_once_and_wait():
    run = Run()
    batch = [Entry("line 1", Submission("a", ("true",), labels=(("os", "linux"),))),
             Entry("line 2", Submission("b", ("true",), labels=(("gpu", "a100"),))),
             Entry("line 3", Submission("c", ("true",), labels=(("gpu", "a100"),)))]
    d = run.start(batch)
    said = run.err.getvalue()
    assert said.count("no fleet node up has the labels gpu=a100") == 1
    assert "os=linux" not in said
    run.finish("a", "b", "c")
    run.clock.advance(FETCH_DELAY)
    assert d.called


def test_a_batch_no_node_can_run_yet_says_so_and_waits():
    run = Run()
    run.fleet.nodes = []
    d = run.start(entries("a"))
    assert "no fleet node is up: the tasks wait in the queue" in run.err.getvalue()
    run.finish("a")
    run.clock.advance(FETCH_DELAY)
    assert d.called


def test_an_interrupted_run_stops_asking_and_prints_nothing_more():
    run = Run(FakeFleet(hold=True))
    d = run.start(entries("a", "b"))
    run.fleet.answer()
    run.finish("a")
    run.clock.advance(FETCH_DELAY)  # its fetch is under way
    run.submitter.interrupt()
    run.fleet.answer()
    failure = d.result
    d.addErrback(lambda f: None)
    assert failure.check(fleet_submit.Interrupted)
    assert run.results() == [] and run.submitter.summary.missing == 2
    calls = len(run.fleet.calls)
    run.clock.advance(10 * POLL)
    run.fleet.answer()
    assert len(run.fleet.calls) == calls and run.listener.stopped


# -- --no-wait


def test_no_wait_prints_the_keys_and_says_which_were_refused():
    run = Run()
    run.fleet.submit_many([Submission("taken", ("other",))], "someone")
    d = Deferred.fromCoroutine(run.submitter.submit_only(entries("a", "taken", "b")))
    assert d.called
    assert run.out.getvalue() == b"a\nb\n"
    assert "line 2: key 'taken' is already used by another command" in run.err.getvalue()
    assert (run.submitter.created, run.submitter.refused, run.submitter.summary.missing) == (
        2, 1, 0)
    assert run.listener is None
    assert "3 sent to the fleet: 2 queued, 0 attached" in run.submitter.submitted_line()
