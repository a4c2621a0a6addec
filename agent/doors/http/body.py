"""Request bodies: capped while they arrive, then validated into values the engine takes."""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from agent.doors.tcp import wire as messages
from agent.doors.tcp.wire import TaskRequest
from agent.doors.http.errors import BadRequest, PayloadTooLarge, Unprocessable

MAX_BODY = 1 << 20
TASK_FIELDS = ("command", "args", "timeout", "env", "cwd", "limits", "max_output_bytes", "id")


class CappedContent(io.BytesIO):
    """A request body store that keeps at most `cap` bytes and notes that more came."""

    def __init__(self, cap: int = MAX_BODY, announced: int | None = None):
        super().__init__()
        self._cap = cap
        self.too_large = announced is not None and announced > cap

    def write(self, data: bytes) -> int:
        if not self.too_large and self.tell() + len(data) > self._cap:
            self.too_large = True
            self.seek(0)
            self.truncate()
        if self.too_large:
            return len(data)
        return super().write(data)


@dataclass(frozen=True)
class TaskSpec:
    """A validated HTTP task: the engine's request plus where and with what it runs."""

    request: TaskRequest
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    max_output_bytes: int | None = None

    def run_options(self, base_env: Mapping[str, str] = os.environ) -> dict:
        """env adds to (or overrides) the agent's environment; it is never stored."""
        options: dict[str, Any] = {}
        if self.env:
            options["env"] = {**base_env, **self.env}
        if self.cwd is not None:
            options["cwd"] = self.cwd
        if self.max_output_bytes is not None:
            options["output_limit"] = self.max_output_bytes
        return options


def read_json(request) -> Any:
    if getattr(request.content, "too_large", False):
        raise PayloadTooLarge(f"request body is larger than {MAX_BODY} bytes")
    raw = request.content.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadRequest(f"request body is not valid UTF-8: {e.reason} at byte {e.start}")
    except ValueError as e:
        raise BadRequest(f"request body is not valid JSON: {e}")


def parse_task(body: Any, idempotency_key: str | None = None) -> TaskSpec:
    """Validate a task body; raise BadRequest or Unprocessable naming the field at fault.

    The task's id (its idempotency key) is the body's "id" or the Idempotency-Key header."""
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, not {_type(body)}")
    unknown = sorted(set(body) - set(TASK_FIELDS))
    if unknown:
        raise Unprocessable(f'unknown field "{unknown[0]}"; the fields are {", ".join(TASK_FIELDS)}')
    command = (_command(body.get("command")), *_args(body.get("args")))
    request = TaskRequest(command, _timeout(body.get("timeout")),
                          _key(body.get("id"), idempotency_key), _limits(body.get("limits")))
    return TaskSpec(request, _env(body.get("env")), _cwd(body.get("cwd")),
                    _positive_int("max_output_bytes", body.get("max_output_bytes")))


def _command(value: Any) -> str:
    if value is None:
        raise Unprocessable('"command" is missing')
    if not isinstance(value, str):
        raise Unprocessable(f'"command" must be a string (the program), not {_type(value)}; '
                            'put its arguments in "args"')
    if not value:
        raise Unprocessable('"command" must not be empty')
    _no_nul('"command"', value)
    return value


def _args(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Unprocessable(f'"args" must be a list of strings, not {_type(value)}')
    for index, arg in enumerate(value):
        if not isinstance(arg, str):
            raise Unprocessable(f'"args"[{index}] must be a string, not {_type(arg)}')
        _no_nul(f'"args"[{index}]', arg)
    return value


def _timeout(value: Any) -> float | None:
    """Seconds, fractions allowed; 0 or missing means none: the TCP rules, in seconds."""
    try:
        return messages.parse_timeout(value, "s")
    except messages.BadRequest as e:
        raise Unprocessable(e.message) from None


def _limits(value: Any) -> tuple[tuple[str, int], ...]:
    """The same resource limits, with the same rules, as on TCP."""
    try:
        return messages.parse_limits(value)
    except messages.BadRequest as e:
        raise Unprocessable(e.message) from None


def _key(field: Any, header: str | None) -> str | None:
    if field is not None:
        if not isinstance(field, str) or not field:
            raise Unprocessable(f'"id" must be a non-empty string, not {_type(field)}')
        if header is not None and header != field:
            raise Unprocessable('"id" and the Idempotency-Key header differ; send one, or the same')
    key = field if field is not None else header
    if key is not None and not key:
        raise Unprocessable("the Idempotency-Key header must not be empty")
    if key is not None and len(key) > messages.MAX_ID:
        raise Unprocessable(f"the task's id must be at most {messages.MAX_ID} characters")
    return key


def _positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Unprocessable(f'"{name}" must be a whole number of at least 1, not {value!r}')
    return value


def _env(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Unprocessable(f'"env" must be an object of strings, not {_type(value)}')
    for name, item in value.items():
        if not name or "=" in name or "\0" in name:
            raise Unprocessable(f'"env" has an invalid variable name {name!r}')
        if not isinstance(item, str):
            raise Unprocessable(f'"env"["{name}"] must be a string, not {_type(item)}')
        _no_nul(f'"env"["{name}"]', item)
    return value


def _cwd(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise Unprocessable(f'"cwd" must be a non-empty string, not {_type(value)}')
    _no_nul('"cwd"', value)
    if not os.path.isdir(value):
        raise Unprocessable(f'"cwd" is not a directory the agent can see: {value}')
    return value


def _no_nul(name: str, value: str) -> None:
    if "\0" in value:
        raise Unprocessable(f"{name} contains a NUL character")


def _type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)
