"""The allow-list: every door's requests pass it before anything else, and what was checked
is what runs (issue 15)."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from twisted.internet.testing import StringTransport
from twisted.python import usage

from agent.core.allowlist import AllowList, BadAllowList, Entry, NotAllowed
from agent.core.lanes import Lane
from agent.core.request import TaskRequest
from agent.doors.tcp.protocol import TaskLineFactory
from agent.options import Options
from tests.fakes import FakeHost, StdoutCollector, exit_with

ECHO = os.path.realpath(shutil.which("echo"))
TRUE = os.path.realpath(shutil.which("true"))


def _file(tmp_path, text):
    path = tmp_path / "allow.toml"
    path.write_text(text)
    return path


@pytest.fixture
def allow(tmp_path):
    return AllowList.load(_file(tmp_path, f"""
[[allow]]
program = "{ECHO}"
args = ["hello", "*"]

[[allow]]
program = "{TRUE}"

[[allow]]
program = "{shutil.which('sh')}"
args = ["-c", "exit 3", "..."]
"""))


def test_a_program_on_the_list_resolves_to_its_real_path(allow):
    assert allow.executable(["echo", "hello", "world"], None, os.environ) == ECHO
    assert allow.executable([TRUE, "any", "thing"], None, os.environ) == TRUE


@pytest.mark.parametrize("argv, why", [
    (["rm", "-rf", "/"], "is not on the allow-list"),
    (["echo", "bye", "x"], "match no pattern"),
    (["echo", "hello"], "match no pattern"),
    (["no-such-program-here"], "not a program the agent can find"),
])
def test_anything_else_is_refused_saying_why(allow, argv, why):
    with pytest.raises(NotAllowed, match=f"command not allowed: .*{why}"):
        allow.executable(argv, None, os.environ)


def test_a_trailing_ellipsis_admits_further_arguments():
    entry = Entry("/bin/sh", ("-c", "exit 3", "..."))
    assert entry.admits(["-c", "exit 3"]) and entry.admits(["-c", "exit 3", "x", "y"])
    assert not entry.admits(["-c", "exit 4"])


def test_a_path_trick_cannot_smuggle_another_program(allow, tmp_path):
    fake = tmp_path / "echo"
    fake.write_text("#!/bin/sh\nrm -rf /\n")
    fake.chmod(0o755)
    with pytest.raises(NotAllowed, match="is not on the allow-list"):
        allow.executable(["echo", "hello", "x"], None, {"PATH": str(tmp_path)})
    with pytest.raises(NotAllowed):
        allow.executable(["./echo", "hello", "x"], str(tmp_path), os.environ)


@pytest.mark.parametrize("text, message", [
    ('[[allow]]\nprogram = "echo"\n', "absolute path"),
    ('[[allow]]\nprogram = "/no/such/thing"\n', "not an executable"),
    (f'[[allow]]\nprogram = "{ECHO}"\nargs = ["...", "x"]\n', '"..." only last'),
    (f'[[allow]]\nprogram = "{ECHO}"\nshell = true\n', "program and args only"),
    ('[programs]\n', "tables and nothing else"),
])
def test_a_bad_allow_file_is_refused_at_start(tmp_path, text, message):
    with pytest.raises(BadAllowList, match=message):
        AllowList.load(_file(tmp_path, text))
    with pytest.raises(usage.UsageError, match=message):
        Options().parseOptions(["--allow-file", str(tmp_path / "allow.toml"),
                                "--data-dir", str(tmp_path)])


def test_admission_refuses_first_and_pins_what_runs(allow):
    host = FakeHost(allow=allow)
    refused = host.engine.admit(TaskRequest(("rm", "-rf", "/tmp/x"), id="k"), Lane(0),
                                StdoutCollector(), "tcp")
    assert refused.result.check(NotAllowed)
    refused.addErrback(lambda _: None)
    started = host.engine.admit(TaskRequest(("echo", "hello", "you")), Lane(0),
                                StdoutCollector(), "tcp")
    assert started.result.task.state == "running"
    assert host.spawn.spawned[0][0] == ["echo", "hello", "you"], "argv as the caller sent it"
    assert host.spawn.executables == [ECHO], "and started from the path that was checked"


def test_the_tcp_door_answers_a_refused_command_and_runs_nothing(allow):
    host = FakeHost(allow=allow)
    factory = TaskLineFactory(host.engine, Lane(0), "s", clock=host.clock)
    proto, transport = factory.buildProtocol(None), StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b'{"command": ["rm", "-rf", "/"], "id": "x"}\n{"command": ["true"]}\n')
    first = json.loads(transport.value().split(b"\n")[0])
    assert (first["exit_code"], first["id"]) == (-1, "x")
    assert first["error"].startswith("command not allowed: ")
    exit_with(host.spawn.protocol(), 0)
    assert [argv for argv, _ in host.spawn.spawned] == [["true"]]
