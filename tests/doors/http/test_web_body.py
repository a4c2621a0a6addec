"""Task bodies: every bad field named, nothing else ever raised, and no shell anywhere."""
from __future__ import annotations

import io

import pytest
from hypothesis import given, settings, strategies as st

from agent.core.request import TaskRequest
from agent.doors.http.body import (MAX_BODY, TASK_FIELDS, CappedContent, TaskSpec, parse_task,
                                   read_json)
from agent.doors.http.errors import ApiError, BadRequest, PayloadTooLarge, Unprocessable


class _Request:
    def __init__(self, content):
        self.content = content


def test_command_and_args_make_the_argv():
    spec = parse_task({"command": "python3", "args": ["-c", "print(1)"]})
    assert spec == TaskSpec(TaskRequest(("python3", "-c", "print(1)"), None))


def test_timeout_is_seconds_with_fractions_and_zero_means_none():
    assert parse_task({"command": "x", "timeout": 0.25}).request.timeout == 0.25
    assert parse_task({"command": "x", "timeout": 0}).request.timeout is None


def test_env_is_added_to_the_agent_environment():
    spec = parse_task({"command": "x", "env": {"A": "1"}})
    assert spec.run_options({"PATH": "/bin", "A": "0"}) == {"env": {"PATH": "/bin", "A": "1"}}
    assert parse_task({"command": "x"}).run_options({"PATH": "/bin"}) == {}


def test_limits_follow_the_tcp_rules():
    assert parse_task({"command": "x", "limits": {"nofile": 64, "cpu_s": 2}}).request.limits == \
        (("cpu_s", 2), ("nofile", 64))
    with pytest.raises(Unprocessable, match="limits"):
        parse_task({"command": "x", "limits": {"nofile": 0}})


def test_a_whole_number_written_as_a_float_is_that_integer():
    """JSON has one number type: 64.0 is the integer 64, as the OpenAPI 3.1 document says."""
    spec = parse_task({"command": "x", "limits": {"nofile": 64.0}, "max_output_bytes": 1449.0})
    assert spec.request.limits == (("nofile", 64),)
    assert spec.run_options({}) == {"output_limit": 1449}
    assert type(spec.run_options({})["output_limit"]) is int


@pytest.mark.parametrize("fields", [{"limits": {"nofile": 1.5}}, {"limits": {"cpu_s": True}},
                                    {"max_output_bytes": 0.0}, {"max_output_bytes": 2.5},
                                    {"max_output_bytes": False}])
def test_a_fraction_or_a_boolean_is_not_a_whole_number(fields):
    with pytest.raises(Unprocessable):
        parse_task({"command": "x", **fields})


def test_an_optional_field_sent_as_null_is_as_if_left_out():
    """As the OpenAPI document says: many clients write an unset field as null."""
    optional = [name for name in TASK_FIELDS if name != "command"]
    assert parse_task({"command": "x", **dict.fromkeys(optional)}) == parse_task({"command": "x"})


def test_cwd_must_be_an_existing_directory(tmp_path):
    assert parse_task({"command": "x", "cwd": str(tmp_path)}).run_options({}) == {"cwd": str(tmp_path)}
    with pytest.raises(Unprocessable, match='"cwd"'):
        parse_task({"command": "x", "cwd": str(tmp_path / "missing")})


@pytest.mark.parametrize("body, words", [
    ([], "must be a JSON object"),
    ({}, '"command" is missing'),
    ({"command": ""}, '"command" must not be empty'),
    ({"command": "a\0b"}, '"command" contains a NUL'),
    ({"command": "x", "args": ["ok", "b\0"]}, '"args"[1] contains a NUL'),
    ({"command": "x", "timeout": -1}, '"timeout" must be a non-negative'),
    ({"command": "x", "timeout": True}, '"timeout" must be a number'),
    ({"command": "x", "env": {"A=B": "1"}}, "invalid variable name"),
    ({"command": "x", "env": []}, '"env" must be an object'),
])
def test_each_bad_field_is_named(body, words):
    with pytest.raises(ApiError) as caught:
        parse_task(body)
    assert words in caught.value.message


def test_malformed_json_and_bad_utf8_are_400():
    with pytest.raises(BadRequest, match="not valid JSON"):
        read_json(_Request(io.BytesIO(b"{")))
    with pytest.raises(BadRequest, match="UTF-8"):
        read_json(_Request(io.BytesIO(b'"\xff"')))


def test_a_body_past_the_cap_is_dropped_and_refused():
    content = CappedContent(cap=10)
    content.write(b"12345")
    content.write(b"678901")
    assert content.too_large and content.getvalue() == b""
    with pytest.raises(PayloadTooLarge):
        read_json(_Request(content))


def test_an_announced_length_past_the_cap_is_refused_before_reading():
    assert CappedContent(announced=MAX_BODY + 1).too_large
    assert not CappedContent(announced=MAX_BODY).too_large


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                       max_size=4),
    max_leaves=12)


@settings(max_examples=300)
@given(body=st.one_of(json_values, st.fixed_dictionaries(
    {"command": json_values}, optional={"args": json_values, "timeout": json_values,
                                        "env": json_values})))
def test_any_json_is_either_a_task_or_a_client_error(body):
    try:
        spec = parse_task(body)
    except (BadRequest, Unprocessable):
        return
    assert spec.request.command[0] == body["command"]
    assert all(isinstance(arg, str) for arg in spec.request.command)


@pytest.mark.parametrize("body, field", [
    ({"command": "echo", "args": ["\ud800"]}, '"args"[0]'),
    ({"command": "\udfff"}, '"command"'),
    ({"command": "x", "id": "\ud800"}, '"id"'),
    ({"command": "x", "cwd": "/tmp/\ud800"}, '"cwd"'),
    ({"command": "x", "env": {"A": "\ud800"}}, '"env"["A"]'),
    ({"command": "x", "env": {"\ud800": "v"}}, '"env" variable name'),
])
def test_a_lone_surrogate_in_any_field_is_a_422_naming_it(body, field):
    with pytest.raises(Unprocessable) as refused:
        parse_task(body)
    assert field in refused.value.message and "lone surrogate" in refused.value.message
    refused.value.message.encode("utf-8")  # the answer itself can be sent


def test_a_lone_surrogate_in_the_idempotency_key_header_is_a_422():
    with pytest.raises(Unprocessable, match="Idempotency-Key header holds a lone surrogate"):
        parse_task({"command": "x"}, "\ud800")


def test_deeply_nested_json_is_a_400():
    with pytest.raises(BadRequest, match="nested too deeply"):
        read_json(_Request(io.BytesIO(b"[" * 100_000 + b"]" * 100_000)))
