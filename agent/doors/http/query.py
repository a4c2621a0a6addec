"""Query-string parameters, validated: a bad one is a 400 that names it."""
from __future__ import annotations

from agent.doors.http.errors import BadRequest


def arg(request, name: str) -> str | None:
    """The last value given for name, or None."""
    values = request.args.get(name.encode())
    return None if not values else values[-1].decode("utf-8", "replace")


def int_arg(request, name: str, default: int, low: int = 0, high: int | None = None) -> int:
    raw = arg(request, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, not {raw!r}") from None
    if value < low or (high is not None and value > high):
        raise BadRequest(f"{name} must be between {low} and {high}, not {value}" if high is not None
                         else f"{name} must be at least {low}, not {value}")
    return value


def choice_arg(request, name: str, choices: tuple[str, ...], default: str) -> str:
    raw = arg(request, name)
    if raw is None:
        return default
    if raw not in choices:
        raise BadRequest(f"{name} must be one of {', '.join(choices)}, not {raw!r}")
    return raw
