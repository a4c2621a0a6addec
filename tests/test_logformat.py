"""--log-format json: one JSON object per line, what log shippers read (part of issue 13)."""
from __future__ import annotations

import io
import json
import re
import signal
import socket
import subprocess
import sys
import time

from twisted.logger import Logger, formatEventAsClassicLogText, formatTime
from twisted.python.failure import Failure

from agent.logformat import (PREFORMATTED, ClassicText, JsonLines, json_line,
                             text_log_destination)
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


# -- text: twistd's own lines, made cheaper (agent.logformat.ClassicText)

def _classic_events():
    seen, log = _events()
    log.info(PREFORMATTED, text="task job-1 true exited exit_code=0 duration_ms=1.5 by tcp",
             id="job-1")
    log.info(PREFORMATTED, text="two\nlines")
    log.info(PREFORMATTED, text="")
    log.error(PREFORMATTED, text=3)
    log.warn("task {id} {argv0} exit_code={exit_code}", id="job-2", argv0="echo", exit_code=3)
    log.info("no time", log_time=None)
    try:
        raise ValueError("boom")
    except ValueError:
        log.failure(PREFORMATTED, Failure(), text="with a failure")
    seen.append({"log_format": "{text}", "text": "no level or namespace", "log_time": 1.5})
    seen.append({"log_format": "{text}", "text": "a system", "log_system": "sys", "log_time": 2.0})
    seen.append({"log_format": None})
    return seen


def test_classic_text_writes_what_twistd_writes_byte_for_byte():
    for event in _classic_events():
        assert ClassicText()(event) == formatEventAsClassicLogText(event), event


def test_classic_text_makes_a_time_s_text_once_a_second(monkeypatch):
    made = []
    monkeypatch.setattr("agent.logformat.formatTime", lambda when: made.append(when) or str(when))
    classic = ClassicText()
    texts = [classic.time_text(when) for when in (100.1, 100.9, 101.0, 101.5, 99.5, None)]
    assert texts == ["100.1", "100.1", "101.0", "101.0", "99.5", "-"]
    assert made == [100.1, 101.0, 99.5]


def test_classic_text_s_time_is_twistd_s():
    classic = ClassicText()
    for when in (0.0, 100.1, 1700000000.999, 1764600000.5):
        assert classic.time_text(when) == formatTime(when)


class _ServerOptions(dict):
    pass


def test_the_text_log_goes_where_twistd_would_put_it(tmp_path, monkeypatch):
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # no handler left behind
    reactor = object()
    assert text_log_destination(None, reactor) is None  # agent.tac: twistd decides
    assert text_log_destination(_ServerOptions(syslog=True, logfile="x"), reactor) is None
    assert text_log_destination(_ServerOptions(logger="a.b", nodaemon=True), reactor) is None
    assert text_log_destination(_ServerOptions(logfile="-", nodaemon=False), reactor) is None
    assert text_log_destination(_ServerOptions(logfile="-", nodaemon=True), reactor) is sys.stdout
    assert text_log_destination(_ServerOptions(logfile=None, nodaemon=True), reactor) is sys.stdout
    log_file = text_log_destination(_ServerOptions(logfile=str(tmp_path / "a.log")), reactor)
    try:
        assert log_file.path == str(tmp_path / "a.log")
    finally:
        log_file.close()
    monkeypatch.chdir(tmp_path)
    log_file = text_log_destination(_ServerOptions(logfile=None, nodaemon=False), reactor)
    try:
        assert log_file.path == str(tmp_path / "twistd.log")
    finally:
        log_file.close()


def test_a_real_agent_writes_classic_lines_to_its_log_file_and_rotates_on_sigusr1(tmp_path):
    log_path = tmp_path / "agent.log"
    agent = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
         "--pidfile=", f"--logfile={log_path}", "agent", "--listen", "tcp:0:interface=127.0.0.1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        port = int(_wait_for(log_path, r"TCP task protocol listening on 127\.0\.0\.1:(\d+)"))
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b'{"command": ["true"], "id": "classic-1"}\n')
            assert json.loads(sock.makefile().readline())["exit_code"] == 0
        line = _wait_for(log_path, r"(.*\[agent\.core\.engine#info\] task classic-1 .*)")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[agent\.core\.engine#info\] "
                            r"task classic-1 true exited exit_code=0 duration_ms=[\d.]+ by .+",
                            line)
        agent.send_signal(signal.SIGUSR1)
        _wait_for_path(tmp_path / "agent.log.1")
    finally:
        agent.terminate()
        assert agent.wait(30) == 0


def _wait_for(path, pattern: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, path.read_text() if path.exists() else "")
        if match:
            return match.group(1)
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in {path}")


def _wait_for_path(path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_the_agent_as_its_own_process_logs_text_through_classic_text(tmp_path, monkeypatch):
    from twisted.logger import FileLogObserver

    from agent.options import Options
    from agent.service import _log_observer
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    options = Options()
    options.parseOptions([])
    options.parent = _ServerOptions(logfile=str(tmp_path / "a.log"))
    observer = _log_observer(options, object(), own_process=True)
    assert isinstance(observer, FileLogObserver) and isinstance(observer.formatEvent, ClassicText)
    assert _log_observer(options, object(), own_process=False) is None  # tests: twistd's
    options["log-format"] = "json"
    assert isinstance(_log_observer(options, object(), own_process=True), JsonLines)
