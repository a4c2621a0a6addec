"""What agentctl prints about tasks: tables, one record, health, and its exit statuses.

Pure functions of the API's JSON. Text a client sent (a command line, an
error) is shown with control characters escaped, so no task can send escape
sequences to the operator's terminal through a listing.
"""
from __future__ import annotations

import shlex

TIMED_OUT, AGENT_FAILED, CANNOT_RUN, NOT_FOUND, INTERRUPTED = 124, 125, 126, 127, 130
"""Exit statuses of `agentctl run` that are not the task's own, as timeout(1) and the
shells use them: 124 timed out, 125 the agent or the network failed, 126 could not
start, 127 no such program, 130 cancelled."""

NOT_FOUND_ERROR = "No such file or directory"
"""The operating system's reason when the program to start does not exist (ENOENT)."""


def printable(text: str) -> str:
    """text with each control or otherwise unprintable character as an escape (\\x1b, \\n)."""
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(c: str) -> str:
    escaped = repr(c)[1:-1]
    return escaped if escaped != c else f"\\u{ord(c):04x}"


def command_line(argv) -> str:
    """The argv as a shell would need it typed, escaped for the terminal."""
    return printable(shlex.join(str(a) for a in argv or ()))


def duration(ms) -> str:
    if ms is None:
        return "-"
    seconds = ms / 1000
    if seconds < 1:
        return f"{ms:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def timestamp(rfc3339) -> str:
    """2026-11-23T04:18:51.561Z as 2026-11-23T04:18:51Z: a second is close enough in a table."""
    if not rfc3339:
        return "-"
    head, dot, _ = rfc3339.partition(".")
    return head + "Z" if dot else rfc3339


COLUMNS = ("ID", "STATE", "EXIT", "SOURCE", "CREATED", "DURATION", "COMMAND")


def task_rows(records) -> list[tuple[str, ...]]:
    return [(printable(str(r.get("id"))), str(r.get("state")), _or_dash(r.get("exit_code")),
             str(r.get("source")), timestamp(r.get("created_at")), duration(r.get("duration_ms")),
             command_line(r.get("command"))) for r in records]


def table(rows, header=COLUMNS, width: int | None = None) -> str:
    """Columns padded to their widest cell; the last one cut at width (a terminal's) if given."""
    rows = [tuple(header), *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]
        if width is not None and len(line) > width:
            line = line[:max(width - 3, 0)] + "..."
        lines.append(line.rstrip())
    return "\n".join(lines)


def record_lines(record: dict) -> str:
    """One record as `field: value` lines, in the API's order."""
    width = max(map(len, record), default=0) + 1
    lines = []
    for field, value in record.items():
        shown = command_line(value) if field == "command" else _or_dash(value)
        lines.append(f"{field + ':':<{width}} {printable(shown)}".rstrip())
    return "\n".join(lines)


def health_line(health: dict) -> str:
    history = health.get("history") or {}
    line = f"{health.get('status')}: {health.get('running')} running"
    if history.get("writable", True):
        return line + ", history writable"
    return (line + f", history not writable since {history.get('since')}: "
            + printable(str(history.get("error"))))


def exit_status(summary: dict) -> tuple[int, str | None]:
    """agentctl run's exit status for a task's end summary, and what to tell the operator.

    The task's own status when it exited or a signal from elsewhere killed it
    (128+N, as a shell has it); else one of the statuses above, with the agent's reason.
    """
    reason, code = summary.get("reason"), summary.get("exit_code")
    error = printable(str(summary.get("error") or reason))
    if reason == "exited" and isinstance(code, int) and 0 <= code <= 255:
        return code, None
    if reason == "signalled" and isinstance(code, int) and 128 < code <= 255:
        return code, error
    if reason == "timeout":
        return TIMED_OUT, error
    if reason == "cancelled":
        return INTERRUPTED, error
    if reason == "start_failed":
        return (NOT_FOUND if NOT_FOUND_ERROR in error else CANNOT_RUN), error
    return AGENT_FAILED, f"{reason}: {error}" if error != reason else f"ended as {reason}"


def _or_dash(value) -> str:
    return "-" if value is None else str(value)
