"""The bearer token: where it comes from, and the one check every protected endpoint makes."""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from twisted.logger import Logger

from agent.doors.http.errors import Unauthorized

log = Logger()

CHALLENGE = b'Bearer realm="agent"'


class NoToken(Exception):
    """The token file exists but holds no token: the API must not start."""


def load_or_create_token(path: str | os.PathLike) -> str:
    """The token in path; on first start, a new random one written there with mode 0600.

    The log says where the token is, never what it is.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return _read_token(path)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    log.info("created a new HTTP API token in {path}", path=str(path))
    return token


def _read_token(path: Path) -> str:
    token = path.read_text().strip()
    if not token:
        raise NoToken(f"{path} holds no token")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warn("the API token file {path} can be read by other users; chmod 600 it",
                 path=str(path))
    log.info("HTTP API token read from {path}", path=str(path))
    return token


class BearerAuth:
    """Compares the Authorization header with the token in constant time."""

    def __init__(self, token: str):
        self._digest = _digest(token.encode("utf-8"))

    def __call__(self, request) -> None:
        header = request.getHeader(b"authorization")
        if header is None:
            raise Unauthorized("this endpoint needs an 'Authorization: Bearer TOKEN' header",
                               {b"WWW-Authenticate": CHALLENGE})
        scheme, _, credentials = header.strip().partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(
                _digest(credentials.strip()), self._digest):
            raise Unauthorized("the bearer token is not valid",
                               {b"WWW-Authenticate": CHALLENGE + b', error="invalid_token"'})


def _digest(value: bytes) -> bytes:
    """Hashing first makes the comparison's time independent of the lengths too."""
    return hashlib.sha256(value).digest()
