"""`agentctl`: the agent's HTTP API from a terminal (docs/agentctl.md).

    agentctl [--url URL] [--token-file FILE] COMMAND ...

Standard library only (argparse, urllib), so it starts at once and runs on any
Python 3.11 beside the agent. Every failure is one line on stderr, never a
traceback. Exit statuses: 0 done; 2 bad arguments; 125 the agent or the
network failed (no answer, an error answer, an unreadable token file); `run`
exits with its task's status (see agent.clients.ctlview.exit_status);
`health` exits 1 while the agent is degraded; 128+N after signal N (130 for
Ctrl-C).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys

from agent.clients import ctlview
from agent.clients.agentapi import (DEFAULT_TOKEN_FILE, DEFAULT_URL, AgentApi, ClientError,
                                    tls_context)
from agent.clients.ctlargs import parse_args
from agent.clients.ctlfleet import cmd_fleet, cmd_nodes
from agent.clients.ctlrun import CANCEL_TIMEOUT, Interrupted, follow_output, run_task, start_task
from agent.clients.ctlview import AGENT_FAILED

MAX_PAGE = 1000
"""The most records GET /tasks gives in one page."""
DOOR_PAGE = 500
"""Records asked for at a time while filtering by door on this side."""


class Console:
    """stdout and stderr as bytes, flushed at each write: output is shown as it comes."""

    def __init__(self, out, err, streams: dict | None = None):
        """streams: where each of a task's streams goes (default: stdout to out, stderr to err)."""
        self.out, self.err = out, err
        self._streams = streams or {"stdout": out, "stderr": err}

    def write(self, stream: str, text: str) -> None:
        f = self._streams.get(stream, self.err)
        f.write(text.encode("utf-8", "replace"))
        f.flush()

    def say(self, text: str) -> None:
        self.out.write(text.encode("utf-8", "replace") + b"\n")
        self.out.flush()

    def warn(self, text: str) -> None:
        self.err.write(f"agentctl: {text}\n".encode("utf-8", "replace"))
        self.err.flush()

    def json(self, value) -> None:
        self.say(json.dumps(value, indent=2, ensure_ascii=False))


def main(argv=None, environ=None, out=None, err=None) -> int:
    environ = os.environ if environ is None else environ
    console = Console(out or sys.stdout.buffer, err or sys.stderr.buffer)
    args = parse_args(argv)
    url = getattr(args, "url", None) or environ.get("AGENT_URL") or DEFAULT_URL
    token_file = (getattr(args, "token_file", None) or environ.get("AGENT_TOKEN_FILE")
                  or DEFAULT_TOKEN_FILE)
    tls = {name: getattr(args, name, None) or environ.get(f"AGENT_{name.upper()}")
           for name in ("ca", "cert", "key")}
    try:
        api = AgentApi(url, token_file, tls_context(**tls))
        return COMMANDS[args.command](api, args, console)
    except ClientError as e:
        console.warn(str(e))
        return AGENT_FAILED
    except Interrupted as e:
        return 128 + e.signum
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except BrokenPipeError:
        _quiet_stdout()
        return 128 + signal.SIGPIPE


def _quiet_stdout() -> None:
    """After a reader of stdout left (`agentctl logs ID | head`), nothing more to say there;
    and the interpreter's final flush must not print a BrokenPipeError."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def cmd_tasks(api: AgentApi, args, console: Console) -> int:
    tasks = list_tasks(api, args.state, args.door, args.limit)
    if args.json:
        console.json(tasks)
    else:
        width = shutil.get_terminal_size().columns if console.out.isatty() else None
        console.say(ctlview.table(ctlview.task_rows(tasks), width=width))
    return 0


def list_tasks(api: AgentApi, state: str | None, door: str | None, limit: int) -> list[dict]:
    """The newest `limit` records, newest first; a door is filtered here, over as many pages
    as it takes (GET /tasks filters by state only)."""
    tasks, cursor = [], None
    while len(tasks) < limit:
        query = {"limit": min(MAX_PAGE, DOOR_PAGE if door else limit - len(tasks))}
        for name, value in (("state", state), ("cursor", cursor)):
            if value is not None:
                query[name] = value
        page = api.call("GET", "/tasks", query)
        tasks += [t for t in page.get("tasks", []) if door is None or t.get("source") == door]
        cursor = page.get("next")
        if cursor is None:
            break
    return tasks[:limit]


def cmd_show(api: AgentApi, args, console: Console) -> int:
    record = api.call("GET", f"/tasks/{args.id}")
    console.json(record) if args.json else console.say(ctlview.record_lines(record))
    return 0


def cmd_run(api: AgentApi, args, console: Console) -> int:
    return run_task(api, task_body(args), console)


def cmd_start(api: AgentApi, args, console: Console) -> int:
    record = start_task(api, task_body(args))
    console.json(record) if args.json else console.say(record["id"])
    return 0


def cmd_logs(api: AgentApi, args, console: Console) -> int:
    """The one stream asked for goes to stdout (to pipe it on), --both each to its own."""
    if args.both:
        follow_output(api, args.id, ("stdout", "stderr"), args.follow, console)
    else:
        stream = "stderr" if args.stderr else "stdout"
        follow_output(api, args.id, (stream,), args.follow, Console(console.out, console.err,
                                                                       {stream: console.out}))
    return 0


def cmd_cancel(api: AgentApi, args, console: Console) -> int:
    record = api.call("POST", f"/tasks/{args.id}/cancel", timeout=CANCEL_TIMEOUT)
    console.json(record) if args.json else console.say(f"{record['id']} {record['state']}")
    return 0


def cmd_purge(api: AgentApi, args, console: Console) -> int:
    record = api.call("DELETE", f"/tasks/{args.id}", {"purge": "true"})
    console.json(record) if args.json else console.say(f"{record['id']} purged")
    return 0


def cmd_health(api: AgentApi, args, console: Console) -> int:
    health = api.call("GET", "/healthz", auth=False)
    console.json(health) if args.json else console.say(ctlview.health_line(health))
    return 0 if health.get("status") == "ok" else 1


def task_body(args) -> dict:
    """POST /tasks's body from run's and start's arguments (already checked by the parser)."""
    body = {"command": args.argv[0], "args": args.argv[1:]}
    if args.timeout:
        body["timeout"] = args.timeout
    if args.env:
        body["env"] = dict(args.env)
    return body


COMMANDS = {"tasks": cmd_tasks, "show": cmd_show, "run": cmd_run, "start": cmd_start,
            "logs": cmd_logs, "cancel": cmd_cancel, "purge": cmd_purge, "health": cmd_health,
            "nodes": cmd_nodes, "fleet": cmd_fleet}


if __name__ == "__main__":
    sys.exit(main())
