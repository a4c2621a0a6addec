"""The one mapping between engine tasks, history records and Outcomes."""
from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest

from agent.core.outcome import Ending, Outcome
from agent.core.request import TaskRequest
from agent.history.records import TaskRecord, state_of


def _ended(state, exit_code, error="", started_at=100.0, **fields):
    return TaskRecord("a" * 32, "tcp", ("cmd",), state, 99.0, started_at=started_at,
                      finished_at=None if started_at is None else started_at + 0.5,
                      duration_ms=None if started_at is None else 500.0, exit_code=exit_code,
                      error=error, pid=None if started_at is None else 7, **fields)


@pytest.mark.parametrize("ending, exit_code, state", [
    (Ending.EXITED, 0, "succeeded"), (Ending.EXITED, 3, "failed"),
    (Ending.SIGNALLED, 137, "failed"), (Ending.TIMED_OUT, -1, "timed_out"),
    (Ending.CANCELLED, -1, "cancelled"), (Ending.OUTPUT_LIMIT, -1, "failed"),
    (Ending.START_FAILED, -1, "failed"),
])
def test_a_tasks_outcome_survives_the_round_trip_through_its_record(ending, exit_code, state):
    started = ending is not Ending.START_FAILED
    outcome = Outcome(ending, exit_code, "why", 9 if ending is Ending.SIGNALLED else None,
                      7 if started else None, 100.0 if started else None,
                      500.0 if started else None)
    task = SimpleNamespace(state="finished", outcome=outcome, request=TaskRequest(("cmd",)))
    assert state_of(task) == state
    record = replace(_ended(state, exit_code, "why", started_at=outcome.started_at),
                     reason=ending.value, signal=outcome.signal)
    assert record.outcome == outcome


def test_a_lost_task_replays_as_ended_by_the_agent_with_the_time_it_ran():
    record = replace(_ended("lost", None, "the agent stopped while it ran"), reason="lost",
                     duration_ms=None)
    outcome = record.outcome
    assert (outcome.ending, outcome.exit_code, outcome.duration_ms) == (Ending.CANCELLED, -1, 500.0)


@pytest.mark.parametrize("record, why", [
    (_ended("succeeded", 0), ("exited", None)),
    (_ended("failed", 137, "killed by signal 9 (SIGKILL)"), ("signalled", 9)),
    (_ended("failed", -1, "output limit exceeded"), ("output_cap", None)),
    (_ended("failed", -1, "cannot start 'x'", started_at=None), ("start_failed", None)),
    (_ended("timed_out", -1, "timeout exceeded"), ("timeout", None)),
])
def test_records_from_before_reasons_were_kept_have_theirs_read_from_state_and_error(record, why):
    assert record.why_it_ended == why


def test_a_running_task_has_no_reason_yet():
    assert TaskRecord("a" * 32, "http", ("sleep",), "running", 1.0).why_it_ended == (None, None)


def test_a_huge_command_is_cut_in_the_record_saying_how_much():
    from agent.history.records import MAX_COMMAND_BYTES, kept_command
    command = ("echo", "a" * 10, "x" * (1 << 20), "tail")
    kept, cut, digest = kept_command(command)
    assert len(kept) <= MAX_COMMAND_BYTES
    assert json.loads(kept)[:2] == ["echo", "a" * 10]
    assert cut == len(json.dumps(list(command))) - len(kept) and digest


def test_a_cut_command_is_still_recognised_by_its_digest():
    from agent.history.records import kept_command
    command = ("echo", "y" * 100_000)
    kept, cut, digest = kept_command(command)
    record = TaskRecord("a" * 32, "tcp", tuple(json.loads(kept)), "succeeded", 1.0,
                        command_cut=cut, command_sha256=digest)
    assert record.is_command(command)
    assert not record.is_command(("echo", "y" * 99_999 + "z"))
    assert not record.is_command(record.command)


def test_a_small_command_is_kept_whole():
    from agent.history.records import kept_command
    assert kept_command(("echo", "hi")) == ('["echo", "hi"]', 0, None)
