"""schemathesis hooks for tests/e2e/test_schemathesis.py (loaded by the `st` it runs).

The OpenAPI document states every rule a single request must follow. Two
refusals depend on the agent's state instead, and no schema can state them;
these hooks keep the generated requests clear of them, so that a refused
request schemathesis counts as valid is always a finding:

- "cwd" must be a directory the agent can see (422 otherwise): a string the
  schema allows but that names no directory becomes "/".
- a key (the body's "id", the Idempotency-Key header) names one command: sent
  again with another one it is a 422. Each key gets a digest of its argv
  appended, so a repeat of the same command still replays its task, and a
  body id and a header sent together are made the same (the document says
  they must be).

Only values the schema allows are changed: an invalid value (a negative test)
goes to the agent as schemathesis generated it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import schemathesis

from agent.core.request import MAX_ID

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_HEADER = re.compile(r"[\x20-\x7e]*[\x21-\x7e][\x20-\x7e]*")
KEY_HEADER = "Idempotency-Key"


@schemathesis.hook
def before_call(context, case, kwargs):
    body = case.body
    if not isinstance(body, dict):
        return
    _in_a_real_directory(body)
    argv = _argv(body)
    if argv is None:
        return
    digest = hashlib.sha256(json.dumps(argv).encode("utf-8", "surrogatepass")).hexdigest()[:16]
    headers = case.headers if case.headers is not None else {}
    header = headers.get(KEY_HEADER)
    if _valid_key(body.get("id")):
        body["id"] = _for_argv(body["id"], digest)
        if _valid_header(header):
            if _valid_header(body["id"]):
                headers[KEY_HEADER] = body["id"]
            else:  # a key a header cannot carry: the body's alone
                del headers[KEY_HEADER]
    elif _valid_header(header) and body.get("id") is None:  # null is the same as absent
        headers[KEY_HEADER] = _for_argv(header, digest)


def _in_a_real_directory(body: dict) -> None:
    cwd = body.get("cwd")
    if isinstance(cwd, str) and cwd and "\0" not in cwd and not os.path.isdir(cwd):
        body["cwd"] = "/"


def _argv(body: dict) -> list[str] | None:
    command = body.get("command")
    args = [] if body.get("args") is None else body["args"]
    if isinstance(command, str) and isinstance(args, list) and all(isinstance(a, str) for a in args):
        return [command, *args]
    return None


def _for_argv(key: str, digest: str) -> str:
    """The key with the argv's digest at its end (once: a case may be sent more than once)."""
    suffix = "#" + digest
    return key if key.endswith(suffix) else key[:MAX_ID - len(suffix)] + suffix


def _valid_key(key) -> bool:
    return isinstance(key, str) and 0 < len(key) <= MAX_ID and not _CONTROL.search(key)


def _valid_header(key) -> bool:
    return _valid_key(key) and _HEADER.fullmatch(key) is not None
