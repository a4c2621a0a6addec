"""The request model every door shares: what a task is, and the rules its fields follow.

A door parses its wire format (a JSON line, an HTTP body) and calls these
validators, so an id, a timeout or a limit means the same on every door; each
door maps InvalidRequest to its own wire error.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

MAX_ID = 1024
"""Longest id: every id is kept in memory as an idempotency key while its task is in the history."""

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")

LIMIT_NAMES = ("cpu_s", "memory_mb", "nofile")
"""Per-task resource limits a request may ask for (see agent.runner.spawn.RLIMITS)."""


@dataclass(frozen=True)
class TaskRequest:
    """One validated request: an argv, a timeout in seconds (None = none), an optional id
    (the task's idempotency key), and resource limits as sorted (name, value) pairs."""

    command: tuple[str, ...]
    timeout: float | None = None
    id: str | None = None
    limits: tuple[tuple[str, int], ...] = ()


class InvalidRequest(ValueError):
    """A field breaks its rule; the message names the field and says what is wrong."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def task_id(value: Any, name: str = '"id"') -> str | None:
    """None (no key), or a string of 1 to MAX_ID characters without control characters.

    The same rule on every door: an empty id is refused rather than taken as
    "no key", so a client that meant to send a key learns that it did not."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string, not {json_type(value)}")
    if not value:
        raise InvalidRequest(f"{name} must not be empty; leave it out for a task without an id")
    if len(value) > MAX_ID:
        raise InvalidRequest(f"{name} must be at most {MAX_ID} characters, not {len(value)}")
    text(value, name)
    if _CONTROL.search(value):
        raise InvalidRequest(f"{name} must not contain control characters")
    return value


def argv_item(value: Any, name: str) -> str:
    """One argument of a command: a string with no NUL that can be encoded to pass to exec."""
    if not isinstance(value, str):
        raise InvalidRequest(f"{name} must be a string, not {json_type(value)}")
    if "\0" in value:
        raise InvalidRequest(f"{name} contains a NUL character")
    return text(value, name)


def text(value: str, name: str) -> str:
    """A string that can be encoded as UTF-8: JSON allows a lone surrogate
    ("\\ud800"), which no argv, file name, log line or answer can carry."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRequest(f"{name} holds a lone surrogate (\\u{ord(value[e.start]):04x}) "
                                 f"at character {e.start}: not text that can be encoded") from None
    return value


def for_log(value: str) -> str:
    """Client text as it may reach a log line: control characters escaped (\\x1b, \\n), so a
    request can neither forge a line nor send escape sequences to an operator's terminal."""
    if _CONTROL.search(value) is None:
        return value
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), value)


def timeout_seconds(value: Any, scale: float = 1.0) -> float | None:
    """0 or missing means no timeout; anything else is a non-negative number, times scale."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequest(f'"timeout" must be a number, not {json_type(value)}')
    if not math.isfinite(value) or value < 0:
        raise InvalidRequest(f'"timeout" must be a non-negative number, not {value!r}')
    if value == 0:
        return None
    return value * scale


def limits(value: Any) -> tuple[tuple[str, int], ...]:
    """{"cpu_s": N, "memory_mb": N, "nofile": N}, each optional, as sorted pairs."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise InvalidRequest(f'"limits" must be an object, not {json_type(value)}')
    pairs = []
    for name, number in sorted(value.items()):
        if name not in LIMIT_NAMES:
            raise InvalidRequest(f'"limits" has unknown key {name!r}; known: {", ".join(LIMIT_NAMES)}')
        whole = whole_number(number)
        if whole is None or whole < 1:
            raise InvalidRequest(f'"limits.{name}" must be a positive integer, not {number!r}')
        pairs.append((name, whole))
    return tuple(pairs)


def whole_number(value: Any) -> int | None:
    """value as an int if it is a JSON number with no fractional part, else None.

    JSON has one number type: 64.0 is the integer 64 (as JSON Schema, and so the
    OpenAPI document, says), and a client whose encoder writes every number as a
    float must not be refused for it. A boolean is not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
