"""Request bodies: capped while they arrive, then validated into values the engine takes."""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from agent.core import request as rules
from agent.core.request import TaskRequest
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
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None


def parse_task(body: Any, idempotency_key: str | None = None) -> TaskSpec:
    """Validate a task body; raise BadRequest or Unprocessable naming the field at fault.

    The task's id (its idempotency key) is the body's "id" or the Idempotency-Key header;
    it follows the same rules as on the TCP door (agent.core.request.task_id)."""
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, not {_type(body)}")
    unknown = sorted(set(body) - set(TASK_FIELDS))
    if unknown:
        raise Unprocessable(f'unknown field "{unknown[0]}"; the fields are {", ".join(TASK_FIELDS)}')
    try:
        command = (_command(body.get("command")), *_args(body.get("args")))
        request = TaskRequest(command, rules.timeout_seconds(body.get("timeout")),
                              _key(body.get("id"), idempotency_key), rules.limits(body.get("limits")))
        return TaskSpec(request, _env(body.get("env")), _cwd(body.get("cwd")),
                        _positive_int("max_output_bytes", body.get("max_output_bytes")))
    except rules.InvalidRequest as e:
        raise Unprocessable(e.message) from None


def header_key(request) -> str | None:
    """The Idempotency-Key header's value (None if absent), which must be ASCII.

    HTTP header values are ASCII (RFC 9110, 5.5): reading other bytes would mean
    guessing their encoding, and replacing what does not decode would make two
    different keys one. A key with other characters goes in the body's "id"."""
    raw = request.getHeader(b"idempotency-key")
    if raw is None:
        return None
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise Unprocessable("the Idempotency-Key header must be ASCII; send a key with other "
                            'characters as the body\'s "id"') from None


def _command(value: Any) -> str:
    if value is None:
        raise Unprocessable('"command" is missing')
    if not isinstance(value, str):
        raise Unprocessable(f'"command" must be a string (the program), not {_type(value)}; '
                            'put its arguments in "args"')
    if not value:
        raise Unprocessable('"command" must not be empty')
    return rules.argv_item(value, '"command"')


def _args(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Unprocessable(f'"args" must be a list of strings, not {_type(value)}')
    return [rules.argv_item(arg, f'"args"[{index}]') for index, arg in enumerate(value)]


def _key(field: Any, header: str | None) -> str | None:
    if field is not None and header is not None and header != field:
        raise Unprocessable('"id" and the Idempotency-Key header differ; send one, or the same')
    if field is not None:
        return rules.task_id(field)
    return rules.task_id(header, "the Idempotency-Key header")


def _positive_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    whole = rules.whole_number(value)
    if whole is None or whole < 1:
        raise Unprocessable(f'"{name}" must be a whole number of at least 1, not {value!r}')
    return whole


def _env(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise Unprocessable(f'"env" must be an object of strings, not {_type(value)}')
    for name, item in value.items():
        if not name or "=" in name or "\0" in name:
            raise Unprocessable(f'"env" has an invalid variable name {name!r}')
        rules.text(name, '"env" variable name')
        rules.argv_item(item, f'"env"["{name}"]')
    return value


def _cwd(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise Unprocessable(f'"cwd" must be a non-empty string, not {_type(value)}')
    rules.argv_item(value, '"cwd"')
    if not os.path.isdir(value):
        raise Unprocessable(f'"cwd" is not a directory the agent can see: {value}')
    return value


_type = rules.json_type
