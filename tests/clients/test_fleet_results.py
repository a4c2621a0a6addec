"""agent-scheduler --fleet's result lines: a fleet record worded as the TCP door's result."""
from __future__ import annotations

import json

from agent.clients.batch import Summary
from agent.clients.fleet_results import conflict_fields, encode, result_fields, stdout_of
from agent.fleet.records import TAIL_BYTES
from tests.clients.fleetfakes import T0, fleet_task


def test_a_finished_task_reads_as_a_tcp_result_plus_where_it_ran():
    task = fleet_task("job-1", ("echo", "hi"), stdout=b"hi\n", duration_ms=12.34567,
                      node="n2", attempt=2, local_task_id="fleet:2:job-1")
    assert result_fields(task) == {
        "command": ["echo", "hi"], "executed_at": int(T0.timestamp()), "duration_ms": 12.346,
        "exit_code": 0, "output": "hi\n", "error": "", "id": "job-1", "state": "finished",
        "attempt": 2, "node_id": "n2", "local_task_id": "fleet:2:job-1"}


def test_the_line_is_spaced_as_the_tcp_doors_and_keeps_unicode():
    line = encode(result_fields(fleet_task("k", ("echo", "é"), stdout="é\n".encode())))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert b'"command": ["echo", "\xc3\xa9"], "executed_at": ' in line
    assert json.loads(line)["output"] == "é\n"


def test_a_timed_out_task_counts_as_timed_out_in_the_summary():
    summary = Summary()
    summary.count(result_fields(fleet_task("k", exit_code=-1, error="timeout exceeded")))
    assert (summary.timed_out, summary.failed, summary.ok) == (1, 0, 0)


def test_a_task_cancelled_while_queued_has_no_run_fields():
    task = fleet_task("k", state="cancelled", exit_code=-1, error="cancelled before it started",
                      duration_ms=None, started=None, node=None, attempt=0, local_task_id=None)
    assert result_fields(task) == {"command": ["true"], "exit_code": -1,
                                   "error": "cancelled before it started", "id": "k",
                                   "state": "cancelled", "attempt": 0}


def test_a_lost_task_says_so_and_shows_no_output():
    task = fleet_task("k", state="lost", exit_code=-1, duration_ms=None, local_task_id=None,
                      error="started 3 time(s), never finished: its node stopped", attempt=3)
    fields = result_fields(task)
    assert "output" not in fields and "executed_at" not in fields
    assert (fields["state"], fields["attempt"], fields["exit_code"]) == ("lost", 3, -1)
    summary = Summary()
    summary.count(fields)
    assert summary.failed == 1


def test_a_cut_tail_says_how_many_first_bytes_are_missing():
    tail = b"x" * TAIL_BYTES
    fields = result_fields(fleet_task("k", stdout=tail, stdout_bytes=TAIL_BYTES + 1000))
    assert fields["output"] == "x" * TAIL_BYTES
    assert fields["output_dropped"] == 1000


def test_a_whole_output_has_no_dropped_field():
    assert "output_dropped" not in result_fields(fleet_task("k", stdout=b"all"))


def test_a_tail_cut_inside_a_character_drops_and_counts_its_leftover_bytes():
    euro = "€".encode()  # 3 bytes: the tail keeps the last two
    tail = euro[1:] + b"end"
    task = fleet_task("k", stdout=tail, stdout_bytes=10 + len(tail))
    assert stdout_of(task) == ("end", 10 + 2)


def test_a_whole_output_that_is_not_utf8_is_replaced_not_dropped():
    assert stdout_of(fleet_task("k", stdout=b"\x80ok\xff")) == ("\ufffdok\ufffd", 0)


def test_a_key_conflict_is_a_refusal_that_does_not_show_the_other_command():
    fields = conflict_fields("k", ("rm", "x"), "key 'k' is already used by another command")
    assert fields == {"command": ["rm", "x"], "exit_code": -1, "id": "k", "state": "refused",
                      "error": "key 'k' is already used by another command"}
    summary = Summary()
    summary.count(fields)
    assert summary.failed == 1
