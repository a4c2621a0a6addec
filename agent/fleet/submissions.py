"""A fleet task as a client writes it (a JSON object: the TCP request's fields plus labels
and max_attempts), checked by the same rules as every door's request."""
from __future__ import annotations

import uuid
from typing import Any

from agent.core.request import (InvalidRequest, argv_item, json_type, limits, task_id, text,
                                timeout_seconds, whole_number)
from agent.fleet.records import Submission

MAX_KEY = 1000
"""Longest fleet key: a node runs attempt N as `fleet:N:KEY`, within the local id's 1024."""
MAX_ATTEMPTS = 100
FIELDS = ("id", "command", "timeout", "limits", "labels", "max_attempts")


def submission_from(obj: Any, timeout_scale: float = 1.0) -> Submission:
    """The Submission an object asks for; raises InvalidRequest naming the field.

    The key is "id", or a new random one ("fleet-" and 32 hex digits) when there is none,
    so every fleet task can be looked up, waited for and cancelled by key."""
    if not isinstance(obj, dict):
        raise InvalidRequest(f"a fleet task must be a JSON object, not {json_type(obj)}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(FIELDS)}")
    key = task_id(obj.get("id"))
    if key is None:
        key = f"fleet-{uuid.uuid4().hex}"
    elif len(key) > MAX_KEY:
        raise InvalidRequest(f'"id" must be at most {MAX_KEY} characters for the fleet, '
                             f"not {len(key)}")
    command = obj.get("command")
    if not isinstance(command, list) or not command:
        raise InvalidRequest('"command" must be a non-empty array of strings')
    argv = tuple(argv_item(item, f'"command[{i}]"') for i, item in enumerate(command))
    attempts = obj.get("max_attempts", 3)
    number = whole_number(attempts)
    if number is None or not 1 <= number <= MAX_ATTEMPTS:
        raise InvalidRequest(f'"max_attempts" must be an integer from 1 to {MAX_ATTEMPTS}, '
                             f"not {attempts!r}")
    return Submission(key, argv, timeout_seconds(obj.get("timeout"), timeout_scale),
                      limits(obj.get("limits")), labels(obj.get("labels")), number)


def labels(value: Any) -> tuple[tuple[str, str], ...]:
    """{"os": "linux"}: the node labels a task needs, as sorted pairs."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise InvalidRequest(f'"labels" must be an object, not {json_type(value)}')
    pairs = []
    for name, wanted in sorted(value.items()):
        if not isinstance(wanted, str):
            raise InvalidRequest(f'"labels.{text(name, "labels")}" must be a string, '
                                 f"not {json_type(wanted)}")
        pairs.append((argv_item(name, 'a name in "labels"'),  # jsonb cannot hold a NUL
                      argv_item(wanted, f'"labels.{name}"')))
    return tuple(pairs)
