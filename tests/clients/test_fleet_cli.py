"""agent-scheduler --fleet on the command line: its options, and the command itself against
a real PostgreSQL with a fake node thread (tests/clients/fleetnode.py) running the tasks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from twisted.python import usage

from agent.clients.scheduler import Options
from agent.fleet import schema
from tests.clients.fleetnode import FakeNode
from tests.postgres import free_port

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def options(*args) -> Options:
    parsed = Options()
    parsed.parseOptions(list(args))
    return parsed


# -- options


@pytest.mark.parametrize("args, message", [
    (["--fleet", "host=db", "--agent", "127.0.0.1:3000"], "--agent and --fleet are two ways"),
    (["--fleet", "host=db", "--pace", "10"], "--pace is for agents, not for --fleet"),
    (["--fleet", "host=db", "--ca", "ca.pem"], "--ca is for agents"),
    (["--no-wait"], "--no-wait needs --fleet"),
    (["--fleet-password-file", "pw"], "--fleet-password-file needs --fleet"),
    (["--timeout-unit", "ms"], "--timeout-unit needs --fleet"),
    (["--fleet", "host=db", "--timeout-unit", "min"], "--timeout-unit wants s or ms"),
    (["--fleet", "host=db password=sec ret"], "not a PostgreSQL connection string"),
])
def test_options_that_do_not_go_together_are_refused(args, message):
    with pytest.raises(usage.UsageError, match=message):
        options(*args)


def test_the_password_file_completes_the_connection_string(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("s3cret\nignored\n")
    parsed = options("--fleet", "host=db user=agent", "--fleet-password-file", str(secret))
    assert conninfo_to_dict(parsed["fleet_dsn"]) == {"host": "db", "user": "agent",
                                                    "password": "s3cret"}
    assert parsed["agents"] == []


def test_an_unreadable_password_file_is_a_usage_error(tmp_path):
    with pytest.raises(usage.UsageError, match="--fleet-password-file: cannot read it: No such"):
        options("--fleet", "host=db", "--fleet-password-file", str(tmp_path / "none"))


def test_help_tells_of_the_fleet_mode():
    text = str(Options())
    assert "--fleet DSN" in text and "--no-wait" in text and "Exit status" in text


def test_the_tcp_modes_do_not_load_psycopg():
    probe = subprocess.run([sys.executable, "-c", "import sys, agent.clients.scheduler; "
                            "print('psycopg' in sys.modules)"], capture_output=True, text=True,
                           env=ENV, cwd=REPO, timeout=30)
    assert probe.stdout == "False\n", probe.stderr


# -- the command


def scheduler(*args, stdin: str = "", timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.clients.scheduler", *args],
                          input=stdin, capture_output=True, text=True, timeout=timeout,
                          env=ENV, cwd=REPO)


def requests(n: int) -> str:
    return "".join(json.dumps({"id": f"t{i}", "command": ["echo", str(i)]}) + "\n"
                   for i in range(n))


@pytest.fixture
def dsn(fleet_dsn):
    with psycopg.connect(fleet_dsn, autocommit=True) as conn:
        schema.migrate(conn)
    return fleet_dsn


@pytest.fixture
def node(dsn):
    worker = FakeNode(dsn).start()
    yield worker
    worker.stop()


def test_it_prints_every_result_and_the_summary_with_the_password_from_a_file(
        dsn, node, tmp_path):
    params = conninfo_to_dict(dsn)
    secret = tmp_path / "pw"
    secret.write_text(params.pop("password") + "\n")
    done = scheduler("--fleet", make_conninfo(**params), "--fleet-password-file", str(secret),
                     stdin=requests(5))
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted((r["id"], r["output"]) for r in results) == [
        (f"t{i}", f"{i}\n") for i in range(5)]
    assert done.stderr.startswith("agent-scheduler: 5 sent, 5 ok, 0 failed, 0 timed out")
    assert secret.read_text().strip() not in done.stdout + done.stderr


def test_a_bad_line_submits_nothing_and_exits_2_naming_it(dsn):
    done = scheduler("--fleet", dsn, stdin=requests(2) + '{"command": "ls"}\n')
    assert done.returncode == 2
    assert done.stderr == ('agent-scheduler: line 3: "command" must be a non-empty array '
                           'of strings\n')
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM agent_fleet_tasks").fetchone()[0] == 0


def test_an_unreachable_database_exits_1_saying_where_and_not_the_password():
    dsn = make_conninfo(host="127.0.0.1", port=free_port(), user="agent", dbname="agent",
                        password="hunter2")
    done = scheduler("--fleet", dsn, stdin=requests(1))
    assert done.returncode == 1
    first = done.stderr.splitlines()[0]
    assert first.startswith("agent-scheduler: cannot reach the fleet database ")
    assert "host=127.0.0.1" in first and "Connection refused" in first
    assert "1 without result" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout


def test_no_wait_prints_the_keys_and_a_refused_key_exits_1(dsn):
    queued = scheduler("--fleet", dsn, "--no-wait", stdin=requests(3))
    assert (queued.returncode, queued.stdout) == (0, "t0\nt1\nt2\n")
    assert "3 sent to the fleet: 3 queued, 0 attached to tasks it knew, 0 refused" \
        in queued.stderr
    clash = json.dumps({"id": "t1", "command": ["echo", "other"]})
    refused = scheduler("--fleet", dsn, "--no-wait", stdin=requests(1) + clash + "\n")
    assert (refused.returncode, refused.stdout) == (1, "t0\n")
    assert "line 2: key 't1' is already used by another command" in refused.stderr


def test_sigterm_while_it_waits_ends_it_and_leaves_the_queued_tasks_in_the_fleet(
        dsn, tmp_path):
    batch = tmp_path / "batch.jsonl"
    batch.write_text(requests(3))
    waiting = subprocess.Popen([sys.executable, "-m", "agent.clients.scheduler", "--fleet", dsn,
                                str(batch)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=ENV, cwd=REPO)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            deadline = time.monotonic() + 30
            while conn.execute("SELECT count(*) FROM agent_fleet_tasks").fetchone()[0] < 3:
                assert time.monotonic() < deadline, "the batch was never queued"
                time.sleep(0.05)
        waiting.send_signal(signal.SIGTERM)
        out, err = waiting.communicate(timeout=20)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 1, err
    assert "no fleet node is up" in err
    assert "agent-scheduler: interrupted; what was queued stays in the fleet" in err
    assert "3 sent, 0 ok, 0 failed, 0 timed out, 0 busy, 3 without result" in err
    assert out == ""
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT DISTINCT state FROM agent_fleet_tasks").fetchall() == [
            ("queued",)]


def test_timeouts_in_milliseconds_are_stored_in_seconds(dsn):
    line = json.dumps({"id": "slow", "command": ["sleep", "9"], "timeout": 1500})
    assert scheduler("--fleet", dsn, "--no-wait", "--timeout-unit", "ms",
                     stdin=line + "\n").returncode == 0
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT timeout FROM agent_fleet_tasks").fetchone()[0] == 1.5
