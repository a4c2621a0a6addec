"""agentctl's pure parts: its command line, the task body, exit statuses, what it prints,
paging and the door filter, and signals during `run` (no network)."""
from __future__ import annotations

import io
import os
import signal

import pytest

from agent.clients.agentapi import ClientError, check_url, read_token
from agent.clients.ctl import list_tasks, main, task_body
from agent.clients.ctlargs import parse_args
from agent.clients.ctlrun import Interrupted, Interrupts
from agent.clients.ctlview import (command_line, duration, exit_status, health_line, printable,
                                   record_lines, table, task_rows)


# -- the command line

def test_run_takes_the_command_after_the_double_dash_whatever_it_looks_like():
    args = parse_args(["run", "--timeout", "2.5", "--env", "A=1", "--env", "B=x=y", "--",
                       "sh", "-c", "echo --timeout", "--"])
    assert args.argv == ["sh", "-c", "echo --timeout", "--"]
    assert task_body(args) == {"command": "sh", "args": ["-c", "echo --timeout", "--"],
                               "timeout": 2.5, "env": {"A": "1", "B": "x=y"}}


def test_run_without_the_double_dash_takes_the_first_word_as_the_program():
    assert parse_args(["run", "ls", "-l"]).argv == ["ls", "-l"]


def test_a_task_body_leaves_out_what_was_not_given():
    assert task_body(parse_args(["start", "--", "true"])) == {"command": "true", "args": []}


@pytest.mark.parametrize("argv", [
    ["run"], ["run", "--"], ["start", "--timeout", "1"],
    ["run", "--timeout", "-1", "--", "true"], ["run", "--timeout", "nan", "--", "true"],
    ["run", "--timeout", "soon", "--", "true"], ["run", "--env", "NOEQUALS", "--", "true"],
    ["run", "--env", "=v", "--", "true"], ["tasks", "--limit", "0"], ["tasks", "--state", "ok"],
    ["tasks", "--door", "ssh"], ["logs", "--stderr", "--both", "ID"], ["logs"], ["show"],
    ["nodez"], [], ["fleet"], ["fleet", "show"], ["fleet", "cancel"], ["fleet", "submit"],
    ["fleet", "submit", "--", ], ["fleet", "list", "--state", "succeeded"],
    ["fleet", "submit", "--label", "os", "--", "true"], ["fleet", "purge", "k"],
])
def test_bad_arguments_exit_2_with_a_usage_message(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "usage: agentctl" in err and "Traceback" not in err


def test_a_run_without_a_command_shows_runs_usage_and_how_to_give_one(capsys):
    with pytest.raises(SystemExit):
        parse_args(["run", "--timeout", "1"])
    assert capsys.readouterr().err.splitlines() == [
        "usage: agentctl run [options] -- CMD ARG...",
        "agentctl run: error: give the command after --, as in agentctl run -- echo hello"]


def test_url_and_token_file_may_come_before_or_after_the_command():
    before = parse_args(["--url", "http://a:1", "--token-file", "t", "tasks"])
    after = parse_args(["tasks", "--url", "http://a:1", "--token-file", "t"])
    assert (before.url, before.token_file) == (after.url, after.token_file) == ("http://a:1", "t")


def test_every_listing_takes_json():
    for argv in (["tasks"], ["show", "ID"], ["start", "--", "true"], ["cancel", "ID"],
                 ["purge", "ID"], ["health"]):
        assert parse_args([*argv[:1], "--json", *argv[1:]]).json is True


def test_logs_reads_stdout_unless_told_otherwise():
    args = parse_args(["logs", "-f", "ID"])
    assert (args.follow, args.stderr, args.both, args.id) == (True, False, False, "ID")


@pytest.mark.parametrize("command", [None, "run", "tasks", "logs"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args([command, "--help"] if command else ["--help"])
    assert exited.value.code == 0
    assert "example" in capsys.readouterr().out


def test_the_url_must_be_http():
    assert check_url("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"
    with pytest.raises(ClientError, match="--url must look like http://HOST:PORT"):
        check_url("127.0.0.1:8080")


def test_the_token_is_the_first_line_of_its_file(tmp_path):
    (tmp_path / "token").write_text("  s3cret  \nsecond line\n")
    assert read_token(str(tmp_path / "token")) == "s3cret"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ClientError, match="holds no token"):
        read_token(str(tmp_path / "empty"))
    with pytest.raises(ClientError, match="cannot read the token file .*missing: No such file"):
        read_token(str(tmp_path / "missing"))


def test_a_bad_url_is_one_line_and_exit_125():
    err = io.BytesIO()
    assert main(["--url", "ftp://x", "tasks"], {}, io.BytesIO(), err) == 125
    assert err.getvalue() == b"agentctl: --url must look like http://HOST:PORT, not 'ftp://x'\n"


def test_a_missing_token_file_is_one_line_and_exit_125(tmp_path):
    err = io.BytesIO()
    environ = {"AGENT_URL": "http://127.0.0.1:9", "AGENT_TOKEN_FILE": str(tmp_path / "nope")}
    assert main(["show", "ID"], environ, io.BytesIO(), err) == 125
    assert err.getvalue().count(b"\n") == 1
    assert err.getvalue().startswith(b"agentctl: cannot read the token file ")


# -- exit statuses of run

@pytest.mark.parametrize("summary, status", [
    ({"reason": "exited", "exit_code": 0}, 0),
    ({"reason": "exited", "exit_code": 3}, 3),
    ({"reason": "signalled", "exit_code": 137, "error": "killed by signal 9 (SIGKILL)"}, 137),
    ({"reason": "timeout", "exit_code": -1, "error": "timeout exceeded"}, 124),
    ({"reason": "cancelled", "exit_code": -1, "error": "cancelled by request"}, 130),
    ({"reason": "start_failed", "exit_code": -1,
      "error": "cannot start 'nope': No such file or directory"}, 127),
    ({"reason": "start_failed", "exit_code": -1,
      "error": "cannot start '/etc/passwd': Permission denied"}, 126),
    ({"reason": "lost", "exit_code": None, "error": ""}, 125),
    ({"reason": "output_cap", "exit_code": -1, "error": "output limit exceeded"}, 125),
    ({"reason": "something new", "exit_code": 0}, 125),
])
def test_run_exits_with_the_tasks_status_or_says_why_not(summary, status):
    assert exit_status(summary)[0] == status


def test_a_task_that_exited_needs_no_explanation_and_the_others_get_the_agents_reason():
    assert exit_status({"reason": "exited", "exit_code": 1}) == (1, None)
    assert exit_status({"reason": "timeout", "exit_code": -1, "error": "timeout exceeded"}) \
        == (124, "timeout exceeded")
    assert exit_status({"reason": "lost", "exit_code": None, "error": "agent died"}) \
        == (125, "lost: agent died")
    assert exit_status({"reason": "lost", "exit_code": None}) == (125, "ended as lost")


# -- what it prints

def test_text_a_client_sent_reaches_the_terminal_with_control_characters_escaped():
    assert printable("a\x1b[31mred\n\t\u200e") == "a\\x1b[31mred\\n\\t\\u200e"
    assert printable("café ünïcode") == "café ünïcode"
    assert command_line(["sh", "-c", "echo hi; printf '\x1b]0;pwned\x07'"]) == \
        "sh -c 'echo hi; printf '\"'\"'\\x1b]0;pwned\\x07'\"'\"''"


def test_durations_read_at_a_glance():
    assert [duration(ms) for ms in (None, 4.2, 1500, 184_000, 7_500_000)] == \
        ["-", "4ms", "1.5s", "3m04s", "2h05m"]


RECORD = {"id": "6c182265b39b44b685c0de2d81bbd54a", "command": ["sh", "-c", "exit 3"],
          "state": "failed", "source": "http", "created_at": "2026-11-23T04:18:51.561Z",
          "duration_ms": 4.1, "exit_code": 3, "error": "", "timeout": None}


def test_a_task_table_has_a_header_and_a_row_a_task():
    lines = table(task_rows([RECORD])).splitlines()
    assert lines[0].split() == ["ID", "STATE", "EXIT", "SOURCE", "CREATED", "DURATION", "COMMAND"]
    assert lines[1].split() == ["6c182265b39b44b685c0de2d81bbd54a", "failed", "3", "http",
                                "2026-11-23T04:18:51Z", "4ms", "sh", "-c", "'exit", "3'"]


def test_an_empty_table_is_its_header():
    assert table(task_rows([])).split() == ["ID", "STATE", "EXIT", "SOURCE", "CREATED",
                                             "DURATION", "COMMAND"]


def test_a_table_is_cut_at_the_terminals_width():
    assert max(map(len, table(task_rows([RECORD]), width=60).splitlines())) <= 60


def test_one_record_is_field_colon_value_lines():
    assert record_lines(RECORD).splitlines()[1:3] == ["command:     sh -c 'exit 3'",
                                                      "state:       failed"]
    assert "timeout:     -" in record_lines(RECORD)


def test_health_in_one_line():
    assert health_line({"status": "ok", "running": 2, "history": {"writable": True}}) == \
        "ok: 2 running, history writable"
    assert health_line({"status": "degraded", "running": 0, "history": {
        "writable": False, "since": "2026-11-23T04:00:00.000Z", "error": "disk full"}}) == \
        "degraded: 0 running, history not writable since 2026-11-23T04:00:00.000Z: disk full"


# -- paging

class PagedApi:
    def __init__(self, pages):
        self.pages, self.queries = pages, []

    def call(self, method, path, query=None, **kwargs):
        assert (method, path) == ("GET", "/tasks")
        self.queries.append(query)
        return self.pages[len(self.queries) - 1]


def test_the_door_filter_reads_pages_until_it_has_enough():
    pages = [{"tasks": [{"id": "1", "source": "http"}, {"id": "2", "source": "tcp"}], "next": "a"},
             {"tasks": [{"id": "3", "source": "http"}], "next": "b"},
             {"tasks": [{"id": "4", "source": "tcp"}, {"id": "5", "source": "tcp"}], "next": "c"}]
    api = PagedApi(pages)
    assert [t["id"] for t in list_tasks(api, "failed", "tcp", 2)] == ["2", "4"]
    assert api.queries == [{"limit": 500, "state": "failed"},
                           {"limit": 500, "state": "failed", "cursor": "a"},
                           {"limit": 500, "state": "failed", "cursor": "b"}]


def test_the_door_filter_stops_at_the_last_page():
    api = PagedApi([{"tasks": [{"id": "1", "source": "http"}], "next": None}])
    assert list_tasks(api, None, "tcp", 50) == []
    assert len(api.queries) == 1


def test_without_a_door_it_asks_for_the_limit_and_pages_past_a_thousand():
    api = PagedApi([{"tasks": [{"id": str(i)} for i in range(1000)], "next": "a"},
                    {"tasks": [{"id": "x"}] * 200, "next": "b"}])
    assert len(list_tasks(api, None, None, 1200)) == 1200
    assert api.queries == [{"limit": 1000}, {"limit": 200, "cursor": "a"}]


# -- signals during run

def test_a_signal_inside_held_waits_for_the_request_to_finish():
    steps = []
    with Interrupts() as interrupts:
        with pytest.raises(Interrupted) as interrupted:
            with interrupts.held():
                os.kill(os.getpid(), signal.SIGINT)
                steps.append("the answer arrived")
        assert interrupted.value.signum == signal.SIGINT
    assert steps == ["the answer arrived"]


def test_outside_held_a_signal_interrupts_at_once_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as interrupted:
        with Interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            pytest.fail("not interrupted")
    assert interrupted.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_signal_ignored_when_started_stays_ignored():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with Interrupts():
            os.kill(os.getpid(), signal.SIGHUP)
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_tls_options_need_an_https_url_and_a_key_needs_its_certificate(tmp_path):
    import pytest as _pytest

    from agent.clients.agentapi import AgentApi, ClientError, tls_context
    with _pytest.raises(ClientError, match="--key needs --cert"):
        tls_context(None, None, str(tmp_path / "key.pem"))
    with _pytest.raises(ClientError, match="cannot load the TLS files"):
        tls_context(str(tmp_path / "missing-ca.pem"), None, None)
    assert tls_context(None, None, None) is None
    with _pytest.raises(ClientError, match="need an https:// --url"):
        AgentApi("http://127.0.0.1:8080", "token", tls_context(None, None, None) or object())
