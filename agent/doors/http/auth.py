"""Who may use the HTTP API: named bearer tokens with scopes, and the one check every
protected endpoint makes.

Two sources, both read at start:
- --token-file: one token in plain text, with every scope (admin); created with a
  random token on first start. Kept for a single operator and for `make run`.
- --tokens-file: named tokens in TOML, each with its scopes, holding only the SHA-256
  of each token, so the file gives nothing away if it leaks:

      [tokens.ci]
      sha256 = "hex SHA-256 of the token"
      scopes = ["read", "run"]

A token's name is the `launched_by` of the tasks it starts ("token:ci").
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path

from twisted.logger import Logger

from agent.doors.http.errors import Forbidden, Unauthorized

log = Logger()

CHALLENGE = b'Bearer realm="agent"'

SCOPES = ("read", "run", "cancel", "purge", "admin")
"""read: list, show, output, the OpenAPI document; run: start tasks; cancel; purge;
admin: every scope."""

MIN_TOKEN_LENGTH = 32
ADMIN = "admin"


class NoToken(Exception):
    """A token file that cannot be used (empty, too short, readable by others, malformed):
    the API must not start. The message says how to fix it."""


@dataclass(frozen=True)
class Principal:
    """Who a request's token says the caller is, and what they may do."""

    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return ADMIN in self.scopes or scope in self.scopes

    @property
    def launched_by(self) -> str:
        return f"token:{self.name}"


def load_or_create_token(path: str | os.PathLike) -> str:
    """The token in path; on first start, a new random one written there with mode 0600.

    The log says where the token is, never what it is.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        token = read_token(path)
        log.info("HTTP API token read from {path}", path=str(path))
        return token
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    log.info("created a new HTTP API token in {path}", path=str(path))
    return token


def read_token(path: Path) -> str:
    """The token in an existing token file, refused as ssh refuses a private key:
    short, or readable by group or others."""
    _refuse_if_others_can_read(path)
    token = path.read_text().strip()
    if not token:
        raise NoToken(f"{path} holds no token")
    if len(token) < MIN_TOKEN_LENGTH:
        raise NoToken(f"the token in {path} has {len(token)} characters; at least "
                      f"{MIN_TOKEN_LENGTH} are needed. Make one with: python3 -c "
                      f"'import secrets; print(secrets.token_urlsafe(32))' > {path}")
    return token


def read_tokens_file(path: Path) -> dict[bytes, Principal]:
    """SHA-256 digest -> Principal, from a --tokens-file; NoToken naming what is wrong."""
    _refuse_if_others_can_read(path)
    try:
        document = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise NoToken(f"{path} is not valid TOML: {e}") from None
    tokens = document.get("tokens")
    unknown = sorted(set(document) - {"tokens"})
    if unknown or not isinstance(tokens, dict) or not tokens:
        raise NoToken(f"{path} must hold [tokens.NAME] tables and nothing else"
                      + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    principals: dict[bytes, Principal] = {}
    for name, entry in tokens.items():
        digest, scopes = _token_entry(path, name, entry)
        if digest in principals:
            raise NoToken(f"{path}: tokens {principals[digest].name!r} and {name!r} are the same")
        principals[digest] = Principal(name, scopes)
    return principals


def _token_entry(path: Path, name: str, entry) -> tuple[bytes, frozenset[str]]:
    where = f"{path}: [tokens.{name}]"
    if not isinstance(entry, dict) or set(entry) - {"sha256", "scopes"}:
        raise NoToken(f"{where} takes sha256 and scopes only")
    digest = entry.get("sha256")
    try:
        raw = bytes.fromhex(digest) if isinstance(digest, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise NoToken(f"{where}: sha256 must be the 64 hex digits of the token's SHA-256 "
                      "(printf %s TOKEN | sha256sum)")
    scopes = entry.get("scopes")
    if (not isinstance(scopes, list) or not scopes
            or not all(isinstance(s, str) and s in SCOPES for s in scopes)):
        raise NoToken(f"{where}: scopes must be a non-empty list of {', '.join(SCOPES)}")
    return raw, frozenset(scopes)


def _refuse_if_others_can_read(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise NoToken(f"{path} does not exist") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise NoToken(f"{path} can be read by other users (mode {stat.S_IMODE(mode):o}); "
                      f"fix it with: chmod 600 {path}")


class TokenAuth:
    """Finds the caller's Principal from the Authorization header, in constant time
    whichever token matches (every known digest is compared)."""

    def __init__(self, principals: dict[bytes, Principal]):
        self._principals = dict(principals)

    def with_admin(self, token: str) -> TokenAuth:
        """These tokens and the --token-file token, which has every scope."""
        return TokenAuth({**self._principals,
                          _digest(token.encode("utf-8")): Principal(ADMIN, frozenset({ADMIN}))})

    def __call__(self, request) -> Principal:
        header = request.getHeader(b"authorization")
        if header is None:
            raise Unauthorized("this endpoint needs an 'Authorization: Bearer TOKEN' header",
                               {b"WWW-Authenticate": CHALLENGE})
        scheme, _, credentials = header.strip().partition(b" ")
        presented = _digest(credentials.strip())
        found = None
        for digest, principal in self._principals.items():
            if hmac.compare_digest(presented, digest):
                found = principal
        if scheme.lower() != b"bearer" or found is None:
            raise Unauthorized("the bearer token is not valid",
                               {b"WWW-Authenticate": CHALLENGE + b', error="invalid_token"'})
        return found


def require(principal: Principal, scope: str) -> None:
    """Forbidden (403, naming the scope) unless the principal has it."""
    if not principal.allows(scope):
        raise Forbidden(f"the token {principal.name!r} lacks the scope {scope!r} "
                        f"(it has: {', '.join(sorted(principal.scopes))})")


def _digest(value: bytes) -> bytes:
    """Hashing first makes the comparison's time independent of the lengths too."""
    return hashlib.sha256(value).digest()
