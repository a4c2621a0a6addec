"""agentctl's fleet commands: `nodes` and `fleet list|show|submit|cancel`, over the fleet
endpoints of an agent started with --fleet (docs/http-api.md#the-fleet), and what they print.

Keys go in the path as one segment each, percent-encoded whole: a key may hold a slash.
"""
from __future__ import annotations

import shutil

from agent.clients.agentapi import AgentApi
from agent.clients.ctlview import (command_line, duration, printable, record_lines, table,
                                   timestamp)

MAX_PAGE = 1000
"""The most tasks GET /fleet/tasks gives in one page."""
NODE_COLUMNS = ("NODE", "STATE", "RUNNING", "HEARTBEAT", "LABELS", "HTTP")
TASK_COLUMNS = ("KEY", "STATE", "EXIT", "NODE", "ATTEMPT", "SUBMITTED", "DURATION", "COMMAND")
SHOWN_APART = ("stdout_tail", "stderr_tail", "output", "attempts")
"""Fields of a fleet task that `fleet show` prints in sections of their own."""


def task_path(key: str, *more: str) -> tuple[str, ...]:
    return ("fleet", "tasks", key, *more)


def cmd_nodes(api: AgentApi, args, console) -> int:
    nodes = api.call("GET", "/fleet/nodes").get("nodes", [])
    if args.json:
        console.json(nodes)
    else:
        console.say(table(node_rows(nodes), NODE_COLUMNS, _width(console)))
    return 0


def cmd_fleet(api: AgentApi, args, console) -> int:
    return FLEET_COMMANDS[args.fleet_command](api, args, console)


def cmd_list(api: AgentApi, args, console) -> int:
    found = list_fleet_tasks(api, args.state, args.node, args.limit)
    if args.json:
        console.json(found)
    else:
        console.say(table(task_rows(found), TASK_COLUMNS, _width(console)))
    return 0


def list_fleet_tasks(api: AgentApi, state: str | None, node: str | None, limit: int) -> list:
    """The newest `limit` fleet tasks, newest first, over as many pages as it takes."""
    found, cursor = [], None
    while len(found) < limit:
        query = {"limit": min(MAX_PAGE, limit - len(found))}
        for name, value in (("state", state), ("node", node), ("cursor", cursor)):
            if value is not None:
                query[name] = value
        page = api.call("GET", "/fleet/tasks", query)
        found += page.get("tasks", [])
        cursor = page.get("next")
        if cursor is None:
            break
    return found[:limit]


def cmd_show(api: AgentApi, args, console) -> int:
    task = api.call("GET", task_path(args.task_key))
    console.json(task) if args.json else console.say(task_lines(task))
    return 0


def cmd_submit(api: AgentApi, args, console) -> int:
    task = api.call("POST", "/fleet/tasks", body=submission(args))
    console.json(task) if args.json else console.say(printable(task["key"]))
    return 0


def cmd_cancel(api: AgentApi, args, console) -> int:
    task = api.call("POST", task_path(args.task_key, "cancel"))
    if args.json:
        console.json(task)
    elif task.get("state") == "running":
        node = printable(str(task.get("node_id")))
        console.say(f"{printable(task['key'])} cancelling (node {node} was told)")
    else:
        console.say(f"{printable(task['key'])} {task.get('state')}")
    return 0


def submission(args) -> dict:
    """POST /fleet/tasks's body from `fleet submit`'s arguments (checked by the parser)."""
    body: dict = {"command": list(args.argv)}
    if args.id is not None:
        body["id"] = args.id
    if args.timeout:
        body["timeout"] = args.timeout
    if args.label:
        body["labels"] = dict(args.label)
    if args.max_attempts is not None:
        body["max_attempts"] = args.max_attempts
    return body


# -- what they print

def node_rows(nodes) -> list[tuple[str, ...]]:
    return [(printable(str(n.get("id"))), str(n.get("state")),
             f"{n.get('running')}/{n.get('parallel') or 'unlimited'}",
             f"{n.get('heartbeat_age', 0):.1f}s ago",
             printable(_pairs(n.get("labels") or {}) or "-"),
             printable(str(n.get("http") or "-"))) for n in nodes]


def task_rows(tasks) -> list[tuple[str, ...]]:
    return [(printable(str(t.get("key"))), str(t.get("state")), _or_dash(t.get("exit_code")),
             printable(str(t.get("node_id") or "-")),
             f"{t.get('attempt')}/{t.get('max_attempts')}", timestamp(t.get("submitted_at")),
             duration(t.get("duration_ms")), command_line(t.get("command"))) for t in tasks]


def task_lines(task: dict) -> str:
    """The record as `field: value` lines, then where the whole output is, each attempt,
    and the tails (control characters escaped: they are a record shown, not output copied)."""
    lines = [record_lines({k: _pairs(v) if isinstance(v, dict) else v
                           for k, v in task.items() if k not in SHOWN_APART})]
    output = task.get("output")
    if output:
        where = f"node {output.get('node_id')}, task {output.get('local_task_id')}"
        lines.append(printable(f"output: {where}" + (f", {output['url']}" if output.get("url")
                                                     else "")))
    for a in task.get("attempts") or ():
        lines.append(printable(
            f"attempt {a.get('attempt')}: node {a.get('node_id')}, "
            f"{a.get('ending') or 'running'}, exit {_or_dash(a.get('exit_code'))}, "
            f"{timestamp(a.get('started_at'))} to {timestamp(a.get('ended_at'))}"
            + (f" ({a['why']})" if a.get("why") else "")))
    for stream in ("stdout", "stderr"):
        tail = task.get(f"{stream}_tail")
        if tail:
            written = task.get(f"{stream}_bytes")
            cut = isinstance(written, int) and written > len(tail.encode())
            lines.append(f"--- {stream}, {written} bytes" + ("; its end:" if cut else ":")
                         + " ---")
            lines += [printable(line) for line in tail.rstrip("\n").split("\n")]
    return "\n".join(lines)


def _pairs(mapping: dict) -> str | None:
    """{"os": "linux"} as os=linux (None, shown as -, when empty)."""
    return ",".join(f"{k}={v}" for k, v in sorted(mapping.items())) or None


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def _width(console) -> int | None:
    return shutil.get_terminal_size().columns if console.out.isatty() else None


FLEET_COMMANDS = {"list": cmd_list, "show": cmd_show, "submit": cmd_submit,
                  "cancel": cmd_cancel}
