"""Pieces the OpenAPI document repeats: patterns, JSON bodies, headers, error answers.

Apart from agent.doors.http.openapi so that each part of the document (the tasks, the
fleet) can be written in a module of its own."""
from __future__ import annotations

NO_NUL = r"^[^\x00]*$"
"""What every string of a command must match: exec cannot pass a NUL."""
NO_CONTROL = r"^[^\x00-\x1f\x7f-\x9f]*$"
"""What an id (an idempotency key) must match: it reaches logs and headers."""


def json_content(schema_name: str) -> dict:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}}}


def header(description: str, schema: dict | None = None, required: bool = False) -> dict:
    return {"description": description, "schema": schema or {"type": "string"},
            **({"required": True} if required else {})}


def error(description: str, retry_after: bool = False, headers: dict | None = None) -> dict:
    answer = {"description": description, **json_content("Error")}
    headers = dict(headers or {})
    if retry_after:
        headers["Retry-After"] = header("seconds after which a retry may succeed",
                                        {"type": "integer", "minimum": 0}, required=True)
    if headers:
        answer["headers"] = headers
    return answer


def or_null(schema: dict) -> dict:
    """schema, or null: an optional field of a body sent as null is taken as absent."""
    return {**schema, "type": [schema["type"], "null"]}


REFUSED = {"401": error("no or a wrong bearer token", headers={
               "WWW-Authenticate": header("Bearer realm=\"agent\", with "
                                          "error=\"invalid_token\" for a wrong token",
                                          required=True)}),
           "403": error("the token lacks the scope this needs (the message names it)")}
"""What every endpoint that needs a token may answer."""
