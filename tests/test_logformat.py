"""--log-format json: one JSON object per line, what log shippers read (part of issue 13)."""
from __future__ import annotations

import io
import json

from twisted.logger import Logger
from twisted.python.failure import Failure

from agent.logformat import PREFORMATTED, JsonLines, json_line
from tests.e2e.conftest import start_agent  # noqa: F401 (a real agent for the last test)


def _events():
    seen = []
    return seen, Logger(namespace="agent.core.engine", observer=seen.append)


def test_a_line_has_time_level_namespace_message_and_the_events_own_fields():
    seen, log = _events()
    log.warn("task {id} {argv0} exit_code={exit_code}", id="job-1", argv0="echo\n", exit_code=3,
             launched_by=("tcp", 1))
    line = json.loads(json_line(seen[0]))
    assert line["level"] == "warn" and line["namespace"] == "agent.core.engine"
    assert line["message"] == "task job-1 echo\n exit_code=3"
    assert line["fields"] == {"id": "job-1", "argv0": "echo\n", "exit_code": 3,
                              "launched_by": ["tcp", 1]}
    assert line["time"].endswith("Z") and "T" in line["time"]


def test_a_preformatted_line_is_its_text_and_its_fields_leave_the_text_out():
    seen, log = _events()
    log.info(PREFORMATTED, text="task job-1 echo exited exit_code=0", id="job-1", exit_code=0)
    line = json.loads(json_line(seen[0]))
    assert line["message"] == "task job-1 echo exited exit_code=0"
    assert line["fields"] == {"id": "job-1", "exit_code": 0}


def test_one_event_is_one_line_whatever_it_holds():
    seen, log = _events()
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.failure("while {what}", Failure(), what="testing", odd=object())
    out = io.StringIO()
    JsonLines(out)(seen[0])
    assert out.getvalue().count("\n") == 1
    line = json.loads(out.getvalue())
    assert "ValueError: boom" in line["failure"] and line["level"] == "critical"
    assert line["fields"]["odd"].startswith("<object object")


def test_a_real_agent_logs_json_lines(start_agent):
    agent = start_agent("--log-format", "json")
    client = agent.connect()
    client.send({"command": ["true"], "id": "json-1"})
    client.receive()
    agent.wait_for_log('"id": "json-1"')
    assert agent.stop() == 0
    lines = [json.loads(line) for line in agent.log_lines if line.strip()]
    assert {"time", "level", "namespace", "message", "fields"} <= set(lines[0])
    ended = [line for line in lines if line["fields"].get("id") == "json-1"]
    assert ended[0]["fields"]["exit_code"] == 0 and ended[0]["level"] == "info"
    assert ended[0]["message"].startswith("task json-1 true exited exit_code=0 duration_ms=")
    assert "text" not in ended[0]["fields"]
