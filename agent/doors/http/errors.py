"""The HTTP door's typed errors: each carries its status and a message for the client."""
from __future__ import annotations


class ApiError(Exception):
    status = 400
    retry_after: int | None = None
    refusal: str | None = None
    """The word a refusal of the request is counted under (agent_refusals_total's
    reason); None for answers that refuse nothing (404, 409, a failure of the agent's)."""
    """Seconds after which a retry may work, sent as Retry-After (HTTP clients'
    retry helpers honour it); None for errors a retry cannot fix."""

    def __init__(self, message: str, headers: dict[bytes, bytes] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})
        if self.retry_after is not None:
            self.headers.setdefault(b"Retry-After", str(self.retry_after).encode())


class BadRequest(ApiError):
    """Malformed: not JSON, not an object, a bad query parameter."""

    status = 400
    refusal = "bad_request"


class Unauthorized(ApiError):
    status = 401
    refusal = "unauthorised"


class Forbidden(ApiError):
    """A valid token without the scope this needs; the message names the scope."""

    status = 403
    refusal = "forbidden"


class NotFound(ApiError):
    status = 404


class MethodNotAllowed(ApiError):
    status = 405


class Conflict(ApiError):
    status = 409


class PayloadTooLarge(ApiError):
    status = 413
    refusal = "too_large"


class Unprocessable(ApiError):
    """Well-formed JSON with a field of the wrong type or value; the message names the field."""

    status = 422
    refusal = "bad_request"


class TooManyTasks(ApiError):
    status = 429
    retry_after = 1  # a running task may end at any moment


class InsufficientStorage(ApiError):
    """The running tasks' output fills --keep-bytes; retrying once some end may work."""

    status = 507
    retry_after = 5


class TooManyFollowers(ApiError):
    status = 429
    refusal = "too_many_followers"
    retry_after = 1


class Unavailable(ApiError):
    """The agent cannot do this now (its history cannot be written); retrying later may work."""

    status = 503
    retry_after = 5  # the store retries its writes every 0.5 s to 30 s
