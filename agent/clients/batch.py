"""What agent-scheduler reads and what it says at the end, whichever way it runs the
batch (straight to agents over TCP, or through the fleet's queue): the requests, and the
summary of their results."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from agent.doors.tcp.wire import BUSY_ERROR, TIMEOUT_ERROR


class InputError(ValueError):
    """The request file cannot be read as JSON lines or a JSON array."""


def parse_requests(text: str) -> list[dict]:
    """Requests as JSON lines (the reference format) or as one JSON array.

    Blank lines are skipped; an error names the line (or array element) so a
    long batch file can be fixed without bisecting it.
    """
    return [request for _, request in numbered_requests(text)]


def numbered_requests(text: str) -> list[tuple[str, dict]]:
    """parse_requests, each request with where it was ("line 3", "element 2"), for
    errors found later (the fleet checks each request before it submits any)."""
    if text.lstrip().startswith("["):
        try:
            requests = json.loads(text)
        except ValueError as e:
            raise InputError(f"input is not a valid JSON array: {e}") from None
        numbered, where = list(enumerate(requests, 1)), "element"
    else:
        numbered, where = [], "line"
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    numbered.append((number, json.loads(line)))
                except ValueError as e:
                    raise InputError(f"line {number} is not valid JSON: {e}") from None
    for number, request in numbered:
        if not isinstance(request, dict):
            raise InputError(f"{where} {number} is not a JSON object")
    return [(f"{where} {number}", request) for number, request in numbered]


def read_input(path: str | None) -> str:
    """The request file (stdin for None or '-') as text, errors as InputError."""
    try:
        if path in (None, "-"):
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as e:
        raise InputError(f"cannot read {path or 'stdin'}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"line {line} is not UTF-8") from None



@dataclass
class Summary:
    sent: int = 0  # tasks written at least once
    ok: int = 0
    failed: int = 0
    timed_out: int = 0
    busy: int = 0  # busy answers printed as results (pace mode)
    missing: int = 0  # tasks without a result
    retried: int = 0  # busy answers the default mode sent again
    asked_again: int = 0  # tasks with an id asked for again after a dropped connection
    attached: int = 0  # fleet: tasks whose key the fleet knew (same command): not queued again

    def count(self, result: dict) -> None:
        error = result.get("error")
        if error == TIMEOUT_ERROR:
            self.timed_out += 1
        elif error == BUSY_ERROR:
            self.busy += 1
        elif result.get("exit_code") == 0 and not error:
            self.ok += 1
        else:
            self.failed += 1

    def line(self, elapsed: float) -> str:
        retried = f"{self.retried} busy answers retried, " if self.retried else ""
        asked = (f"{self.asked_again} asked for again after a dropped connection, "
                 if self.asked_again else "")
        attached = (f"{self.attached} attached to tasks the fleet knew, "
                    if self.attached else "")
        return (f"agent-scheduler: {self.sent} sent, {self.ok} ok, {self.failed} failed, "
                f"{self.timed_out} timed out, {self.busy} busy, {self.missing} without result, "
                f"{retried}{asked}{attached}{elapsed:.2f} s")
