"""The HTTP door's typed errors: each carries its status and a message for the client."""
from __future__ import annotations


class ApiError(Exception):
    status = 400

    def __init__(self, message: str, headers: dict[bytes, bytes] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ApiError):
    """Malformed: not JSON, not an object, a bad query parameter."""

    status = 400


class Unauthorized(ApiError):
    status = 401


class NotFound(ApiError):
    status = 404


class MethodNotAllowed(ApiError):
    status = 405


class Conflict(ApiError):
    status = 409


class PayloadTooLarge(ApiError):
    status = 413


class Unprocessable(ApiError):
    """Well-formed JSON with a field of the wrong type or value; the message names the field."""

    status = 422


class TooManyTasks(ApiError):
    status = 429


class Unavailable(ApiError):
    """The agent cannot do this now (its history cannot be written); retrying later may work."""

    status = 503
