"""The wire format, rule by rule: every bad-input class gets its own clear error."""
import json

import pytest

from agent.doors.tcp.wire import BadRequest, TaskRequest, encode_error, encode_result, parse_request
from agent.core.outcome import Ending, Outcome


def test_minimal_request_has_no_timeout_and_no_id():
    assert parse_request(b'{"command": ["true"]}') == TaskRequest(("true",), None, None)


def test_timeout_in_seconds_by_default():
    assert parse_request(b'{"command": ["true"], "timeout": 60}').timeout == 60


def test_timeout_in_milliseconds_is_converted_to_seconds():
    assert parse_request(b'{"command": ["true"], "timeout": 500}', "ms").timeout == 0.5


def test_zero_timeout_means_no_timeout():
    assert parse_request(b'{"command": ["true"], "timeout": 0}').timeout is None


def test_fractional_timeout_is_accepted():
    assert parse_request(b'{"command": ["true"], "timeout": 0.25}').timeout == 0.25


def test_id_is_kept():
    assert parse_request(b'{"command": ["true"], "id": "job-7"}').id == "job-7"


def test_unknown_fields_are_ignored():
    assert parse_request(b'{"command": ["true"], "priority": 3}').command == ("true",)


@pytest.mark.parametrize(
    "line, message",
    [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b"[1, 2]", "must be a JSON object, not an array"),
        (b'"text"', "must be a JSON object, not a string"),
        (b"{}", '"command" is missing'),
        (b'{"command": "ls -l"}', '"command" must be a list of strings, not a string'),
        (b'{"command": []}', '"command" must not be empty'),
        (b'{"command": ["ls", 3]}', '"command"[1] must be a string, not a number'),
        (b'{"command": [""]}', '"command"[0] must not be empty'),
        (b'{"command": ["a\\u0000b"]}', "contains a NUL character"),
        (b'{"command": ["true"], "timeout": "5"}', '"timeout" must be a number, not a string'),
        (b'{"command": ["true"], "timeout": true}', '"timeout" must be a number, not a boolean'),
        (b'{"command": ["true"], "timeout": -1}', '"timeout" must be a non-negative number'),
        (b'{"command": ["true"], "id": 5}', '"id" must be a string, not a number'),
    ],
)
def test_bad_requests_say_what_is_wrong(line, message):
    with pytest.raises(BadRequest) as caught:
        parse_request(line)
    assert message in caught.value.message


def test_bad_request_keeps_command_and_id_for_the_echo():
    with pytest.raises(BadRequest) as caught:
        parse_request(b'{"command": ["true"], "timeout": -5, "id": "x"}')
    assert caught.value.command == ["true"]
    assert caught.value.id == "x"


def _decode(line: bytes) -> dict:
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    return json.loads(line)


def test_result_of_a_task_that_ran():
    outcome = Outcome(Ending.EXITED, 3, "", pid=10, started_at=1700000000.9, duration_ms=12.5)
    result = _decode(encode_result(["cmd", "-x"], outcome, "out\n", "id-1"))
    assert result == {"command": ["cmd", "-x"], "executed_at": 1700000000, "duration_ms": 12.5,
                      "exit_code": 3, "output": "out\n", "error": "", "id": "id-1"}


def test_result_keys_come_in_protocol_order():
    outcome = Outcome(Ending.EXITED, 0, "", started_at=1.0, duration_ms=1.0)
    result = _decode(encode_result(["true"], outcome, ""))
    assert list(result) == ["command", "executed_at", "duration_ms", "exit_code", "output", "error"]


def test_start_failure_has_no_timing_and_no_output():
    result = _decode(encode_result(["nope"], Outcome.start_failed("cannot start 'nope': No such file"),
                                   None))
    assert result == {"command": ["nope"], "exit_code": -1,
                      "error": "cannot start 'nope': No such file"}


def test_non_ascii_output_stays_valid_json():
    outcome = Outcome(Ending.EXITED, 0, "", started_at=1.0, duration_ms=1.0)
    line = encode_result(["x"], outcome, "caf\u00e9 \ufffd\n")
    assert _decode(line)["output"] == "caf\u00e9 \ufffd\n"


def test_error_result_echoes_whatever_command_was_sent():
    assert _decode(encode_error("bad", {"weird": 1}, "i")) == {
        "command": {"weird": 1}, "exit_code": -1, "error": "bad", "id": "i"}


def test_limits_are_parsed_into_sorted_pairs():
    request = parse_request(b'{"command": ["x"], "limits": {"nofile": 64, "cpu_s": 2}}')
    assert request.limits == (("cpu_s", 2), ("nofile", 64))


@pytest.mark.parametrize("limits, message", [
    ('[1]', '"limits" must be an object'),
    ('{"disk_gb": 1}', "unknown key 'disk_gb'"),
    ('{"cpu_s": 0}', '"limits.cpu_s" must be a positive integer'),
    ('{"memory_mb": 1.5}', '"limits.memory_mb" must be a positive integer'),
])
def test_bad_limits_say_what_is_wrong(limits, message):
    with pytest.raises(BadRequest, match=message):
        parse_request(b'{"command": ["x"], "limits": ' + limits.encode() + b"}")
