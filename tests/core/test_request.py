"""The field rules every door shares (agent.core.request), and client text in logs."""
from __future__ import annotations

import pytest

from agent.core import request
from agent.core.request import InvalidRequest


@pytest.mark.parametrize("value", ["a", "job-17", "x" * 1024, "é-ünïcode-ok", "with space"])
def test_good_ids(value):
    assert request.task_id(value) == value


@pytest.mark.parametrize("value, message", [
    ("", "must not be empty"), ("x" * 1025, "at most 1024 characters"),
    ("a\nb", "control characters"), ("a\x1b[31m", "control characters"), ("\x85", "control"),
    ("\ud800", "lone surrogate"), (5, "must be a string, not a number"),
])
def test_bad_ids_say_what_is_wrong(value, message):
    with pytest.raises(InvalidRequest, match=message):
        request.task_id(value)


def test_a_missing_id_is_no_key():
    assert request.task_id(None) is None


@pytest.mark.parametrize("value", ["\ud800", "ok\udfff", "\udc80tail"])
def test_an_argument_with_a_lone_surrogate_is_refused_naming_the_field(value):
    with pytest.raises(InvalidRequest, match=r'"args"\[2\] holds a lone surrogate'):
        request.argv_item(value, '"args"[2]')


def test_for_log_escapes_control_characters_and_keeps_the_rest():
    assert request.for_log("rm\x1b[2J\nforged line") == "rm\\x1b[2J\\nforged line"
    assert request.for_log("plain ünïcode") == "plain ünïcode"
