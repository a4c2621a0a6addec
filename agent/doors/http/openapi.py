"""GET /openapi.json: the API described in OpenAPI 3.1; tests hold it to the real routes
and fuzz the API against it (tests/doors/http/test_schemathesis.py).

3.1, not 3.0: its schemas are JSON Schema 2020-12, which can say what an
environment variable's name must be (propertyNames)."""
from __future__ import annotations

from typing import Any

from agent.core.request import LIMIT_NAMES, MAX_ID
from agent.core.outcome import REASONS
from agent.doors.http.output import MAX_OFFSET
from agent.doors.http.dashboard import FILES as PAGE_FILES, HEADERS as PAGE_HEADERS
from agent.doors.http import openapi_fleet
from agent.doors.http.openapi_shapes import (NO_CONTROL, NO_NUL, REFUSED as _REFUSED,
                                             error as _error, header as _header,
                                             json_content as _json, or_null as _or_null)
from agent.history.store import STATES
from agent.history.table import MAX_INTEGER

TASK_ID = "^[0-9a-f]{32}$"
"""What the agent names a task by; any other id is a task it does not know (404)."""

TASK_PROPERTIES: dict[str, Any] = {
    "id": {"type": "string", "pattern": TASK_ID, "description": "32 hex digits"},
    "command": {"type": "array", "items": {"type": "string"}, "description": "the argv"},
    "state": {"type": "string", "enum": list(STATES)},
    "source": {"type": "string", "enum": ["tcp", "http"]},
    "created_at": {"type": "string", "format": "date-time"},
    "started_at": {"type": ["string", "null"], "format": "date-time"},
    "finished_at": {"type": ["string", "null"], "format": "date-time"},
    "duration_ms": {"type": ["number", "null"]},
    "exit_code": {"type": ["integer", "null"],
                  "description": "-1 when the agent ended the task or it never started"},
    "error": {"type": ["string", "null"],
              "description": "empty when the process exited on its own; null until it ended"},
    "pid": {"type": ["integer", "null"]},
    "timeout": {"type": ["number", "null"], "description": "seconds"},
    "stdout_bytes": {"type": "integer", "description": "written so far, dropped ones included"},
    "stderr_bytes": {"type": "integer"},
    "stdout_dropped": {"type": "integer", "description": "oldest bytes not kept (--max-log-bytes)"},
    "stderr_dropped": {"type": "integer"},
    "request_id": {"type": ["string", "null"],
                   "description": "the TCP request's id or the HTTP Idempotency-Key"},
    "reason": {"type": ["string", "null"], "enum": [*REASONS, None],
               "description": "why it ended; null while it runs"},
    "signal": {"type": ["integer", "null"],
               "description": "the signal that killed it, when the agent did not send it"},
    "cleanup": {"type": ["string", "null"], "enum": ["complete", "incomplete", None],
                "description": "whether its process group was verified empty after the end"},
    "command_cut": {"type": "integer", "minimum": 0,
                    "description": "bytes of the command's JSON the record does not keep "
                                   "(past 64 KiB; the task itself got its whole argv)"},
    "launched_by": {"type": ["string", "null"],
                    "description": "who asked for it: 'token:NAME' over HTTP; over TCP "
                                   "'cert:SUBJECT' with client certificates, else 'tcp:HOST:PORT'"},
}

ENV_NAME = r"^[^=\x00]*$"
"""What an environment variable's name must match, besides not being empty."""
_KEY = {"type": "string", "minLength": 1, "maxLength": MAX_ID, "pattern": NO_CONTROL}
HEADER_KEY = r"^[\x20-\x7e]*[\x21-\x7e][\x20-\x7e]*$"
"""A key in a header: printable ASCII, not blank (HTTP drops the spaces around a value)."""

NEW_TASK_PROPERTIES: dict[str, Any] = {
    "command": {"type": "string", "minLength": 1, "pattern": NO_NUL,
                "description": "the program; no shell"},
    "args": {"type": "array", "items": {"type": "string", "pattern": NO_NUL}},
    "timeout": {"type": "number", "minimum": 0,
                "description": "seconds; 0 or absent: none"},
    "env": {"type": "object",
            "propertyNames": {"minLength": 1, "pattern": ENV_NAME},
            "additionalProperties": {"type": "string", "pattern": NO_NUL},
            "description": "added to the agent's environment; not stored"},
    "cwd": {"type": "string", "minLength": 1, "pattern": NO_NUL,
            "description": "a directory the agent can see (422 if it is not one)"},
    "limits": {"type": "object", "additionalProperties": False,
               "description": "resource limits applied in the child, as on TCP",
               "properties": {name: {"type": "integer", "minimum": 1}
                              for name in LIMIT_NAMES}},
    "max_output_bytes": {
        "type": "integer", "minimum": 1,
        "description": "end the task (reason output_cap) once it has written this many "
                       "stdout bytes; absent: no cap, and --max-log-bytes keeps the newest output"},
    "id": {**_KEY, "description": "idempotency key (or the Idempotency-Key header): a task "
                                  "with a key the agent knows is not started again; the "
                                  "answer is that task"},
}
"""A task body's fields (agent.doors.http.body.parse_task); only command is required."""


_ID = {"name": "id", "in": "path", "required": True,
       "schema": {"type": "string", "pattern": TASK_ID}}


_STATE = {"type": "string", "enum": list(STATES)}

_PAGE_HEADERS = {name.decode(): _header("always " + value.decode(), {"type": "string", "const": value.decode()}, required=True)
                 for name, value in PAGE_HEADERS.items()}
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header", "schema": {**_KEY, "pattern": HEADER_KEY},
    "description": "the task's id, as the body's id: a key the agent already knows starts "
                   "nothing; the answer is about the task it named (Idempotent-Replayed: true). "
                   "ASCII, as header values are: a key with other characters goes in the body. "
                   "With an id in the body too, both must be the same (422 otherwise)"}
_BAD_TASK = {"400": _error("malformed JSON"), "413": _error("body over 1 MiB"),
             "409": _error("the id named a task removed from the history while it was read; "
                           "try again"),
             "422": _error("a field of the wrong type (the message names it), or a known "
                           "id/Idempotency-Key sent with a different command"),
             "429": _error("--max-running HTTP tasks are already running", retry_after=True),
             "403": _error("the command is not on the allow-list (command not allowed: ...), "
                           "the token may not run tasks, or the key names a task it may not read"),
             "503": _error("the task history cannot be written; nothing was started",
                           retry_after=True),
             "507": _error("the output of running tasks already fills --keep-bytes; nothing "
                           "was started", retry_after=True)}
_NEW_TASK = {"required": True, "content": {"application/json": {
    "schema": {"$ref": "#/components/schemas/NewTask"},
    "example": {"command": "echo", "args": ["hello world"], "timeout": 2.5}}}}
_TASK = {"description": "the task", **_json("Task")}


def _links(task_id: str) -> dict:
    """Where a task's id leads, for a reader and for tools that follow links (schemathesis's
    stateful phase). The DELETE link purges: a DELETE that only cancels leaves the task in
    the history, which a tool taking DELETE as removal would call a use after free."""
    return {"links": {
        "GetTask": {"operationId": "getTask", "parameters": {"id": task_id}},
        "GetTaskOutput": {"operationId": "getTaskOutput", "parameters": {"id": task_id}},
        "CancelTask": {"operationId": "cancelTask", "parameters": {"id": task_id}},
        "PurgeTask": {"operationId": "deleteTask",  # "true" as it goes on the wire
                      "parameters": {"id": task_id, "query.purge": "true"}}}}


_FROM_BODY = "$response.body#/id"
_CANCEL_RESPONSES = {"200": {"description": "the cancelled task", **_json("Task")},
                     "404": _error("no such task"),
                     "409": _error("the task has already ended"), **_REFUSED}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "agent HTTP API", "version": "1",
                 "description": "Run commands as long-running tasks, follow their output, "
                                "cancel them, and read the history of every task, "
                                "whichever door (TCP or HTTP) started it; on an agent "
                                "started with --fleet, the fleet's nodes and tasks too."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Task": {"type": "object", "properties": TASK_PROPERTIES,
                         "required": list(TASK_PROPERTIES)},
                "NewTask": {
                    "type": "object", "required": ["command"], "additionalProperties": False,
                    "properties": {"command": NEW_TASK_PROPERTIES["command"],
                                   **{name: _or_null(schema) for name, schema in
                                      NEW_TASK_PROPERTIES.items() if name != "command"}},
                    "description": "every field but command may be null: the same as "
                                   "leaving it out"},
                "TaskPage": {"type": "object", "required": ["tasks", "next"], "properties": {
                    "tasks": {"type": "array", "items": {"$ref": "#/components/schemas/Task"}},
                    "next": {"type": ["string", "null"],
                             "description": "pass as ?cursor= for the next page"}}},
                "Health": {"type": "object", "required": ["status", "running", "history"],
                           "properties": {
                    "status": {"type": "string", "enum": ["ok", "degraded"],
                               "description": "degraded while the history cannot be written"},
                    "running": {"type": "integer"},
                    "history": {"type": "object", "properties": {
                        "writable": {"type": "boolean"},
                        "full": {"type": "boolean",
                                 "description": "running tasks' output alone fills "
                                                "--keep-bytes (new tasks get 507)"},
                        "error": {"type": ["string", "null"],
                                  "description": "why writing fails"},
                        "since": {"type": ["string", "null"], "format": "date-time"},
                        "waiting": {"type": "integer",
                                    "description": "records kept in memory until they can be "
                                                   "written"},
                        "dropped": {"type": "integer",
                                    "description": "records given up (over 100000 waiting)"}}}}},
                "Error": {"type": "object", "required": ["error"],
                          "properties": {"error": {"type": "string"}}},
                **openapi_fleet.SCHEMAS,
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/": {"get": {
                "operationId": "dashboard", "security": [],
                "summary": "the operator's web page (docs/dashboard.md); needs no token, "
                           "every call it makes sends one",
                "responses": {"200": {"description": "the page", "headers": _PAGE_HEADERS,
                                      "content": {"text/html": {"schema": {"type": "string"}}}}}}},
            "/static/{name}": {"get": {
                "operationId": "dashboardFile", "security": [],
                "summary": "one of the page's files; needs no token",
                "parameters": [{"name": "name", "in": "path", "required": True,
                                "schema": {"type": "string", "enum": list(PAGE_FILES)}}],
                "responses": {
                    "200": {"description": "the file", "headers": _PAGE_HEADERS, "content": {
                        media.split(";")[0]: {"schema": {"type": "string"}}
                        for media in sorted({kind.decode() for kind in PAGE_FILES.values()})}},
                    "404": _error("no such file")}}},
            "/healthz": {"get": {
                "operationId": "health", "summary": "liveness; needs no token", "security": [],
                "responses": {"200": {"description": "up", **_json("Health")}}}},
            "/openapi.json": {"get": {
                "operationId": "openapi", "summary": "this document",
                "responses": {"200": {"description": "OpenAPI 3", "content": {
                    "application/json": {"schema": {"type": "object"}}}}, **_REFUSED}}},
            "/metrics": {"get": {
                "operationId": "metrics",
                "summary": "the agent's metrics in the Prometheus text format (docs/metrics.md)",
                "responses": {"200": {"description": "the Prometheus text exposition format",
                                      "content": {"text/plain": {"schema": {"type": "string"}}}},
                              **_REFUSED}}},
            "/run": {"post": {
                "operationId": "runTask", "summary": "run a command to completion and answer with its stdout",
                "parameters": [_IDEMPOTENCY_KEY],
                "requestBody": _NEW_TASK,
                "responses": {
                    "200": {"description": "stdout as text; X-Exit-Code, X-Task-Id, X-Task-State "
                                           "and (when something went wrong) X-Error headers",
                            "headers": {
                                "X-Task-Id": _header("the task's id", {"type": "string",
                                                                       "pattern": TASK_ID},
                                                     required=True),
                                "X-Exit-Code": _header("its exit code (-1: the agent ended it "
                                                       "or it never started)",
                                                       {"type": "integer"}, required=True),
                                "X-Task-State": _header("its state", _STATE, required=True),
                                "X-Error": _header("what went wrong, on one line"),
                                "Idempotent-Replayed": _header(
                                    "true: the answer is an earlier task's, with the same key",
                                    {"type": "string", "enum": ["true"]}),
                                "X-Stdout-Dropped": _header(
                                    "replayed: oldest stdout bytes no longer kept",
                                    {"type": "integer", "minimum": 0})},
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                            **_links("$response.header.X-Task-Id")},
                    **_BAD_TASK, **_REFUSED}}},
            "/tasks": {
                "post": {
                    "operationId": "createTask", "summary": "start a task",
                    "parameters": [_IDEMPOTENCY_KEY],
                    "requestBody": _NEW_TASK,
                    "responses": {"201": {**_TASK, "headers": {
                        "Location": _header("/tasks/ID", required=True)}, **_links(_FROM_BODY)},
                        "200": {"description": "the task an earlier request with the same key "
                                               "started (running or ended); nothing new started",
                                **_json("Task"), "headers": {
                                    "Location": _header("/tasks/ID", required=True),
                                    "Idempotent-Replayed": _header(
                                        "the answer is an earlier task's",
                                        {"type": "string", "enum": ["true"]}, required=True)},
                                **_links(_FROM_BODY)},
                        **_BAD_TASK, **_REFUSED}},
                "get": {
                    "operationId": "listTasks", "summary": "the history, newest first",
                    "parameters": [
                        {"name": "state", "in": "query", "schema": _STATE},
                        {"name": "limit", "in": "query",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 1000,
                                    "default": 50}},
                        {"name": "cursor", "in": "query",
                         "description": "a page's next, as it was sent",
                         "schema": {"type": "integer", "minimum": 0, "maximum": MAX_INTEGER}},
                        {"name": "source", "in": "query",
                         "description": "only the tasks one door started",
                         "schema": {"type": "string", "enum": ["tcp", "http", "any"],
                                    "default": "any"}},
                        {"name": "q", "in": "query",
                         "description": "only tasks whose command holds this text (within an "
                                        "argument, as the record keeps it)",
                         "schema": {"type": "string", "maxLength": 200}}],
                    "responses": {"200": {"description": "one page", **_json("TaskPage")},
                                  "400": _error("a bad parameter"), **_REFUSED}}},
            "/tasks/{id}": {
                "parameters": [_ID],
                "get": {"operationId": "getTask", "summary": "one task",
                        "responses": {"200": _TASK, "404": _error("no such task"), **_REFUSED}},
                "delete": {
                    "operationId": "deleteTask",
                    "summary": "cancel a task (same as POST /tasks/{id}/cancel); with "
                               "purge=true, remove an ended task's record and output instead",
                    "parameters": [
                        {"name": "purge", "in": "query",
                         "description": "true: remove the ended task from the history, output "
                                        "included (GET then answers 404); never cancels",
                         "schema": {"type": "boolean", "default": False}}],
                    "responses": {
                        "200": {"description": "the cancelled task; with purge=true, the task "
                                               "as it was before its removal", **_json("Task")},
                        "400": _error("purge is neither true nor false"),
                        "404": _error("no such task"),
                        "409": _error("the task has already ended (cancel); the task has not "
                                      "ended yet (purge=true: cancel it first)"),
                        "503": _error("purge=true: the task history cannot be written; "
                                      "nothing was purged", retry_after=True),
                        **_REFUSED}}},
            "/tasks/{id}/cancel": {
                "parameters": [_ID],
                "post": {"operationId": "cancelTask",
                         "summary": "kill the task's process group: SIGTERM, then SIGKILL after "
                                    "--kill-grace seconds; answers once it has ended",
                         "responses": _CANCEL_RESPONSES}},
            "/tasks/{id}/output": {
                "parameters": [_ID],
                "get": {
                    "operationId": "getTaskOutput",
                    "summary": "the task's output; follow=true streams it until the task ends",
                    "parameters": [
                        {"name": "stream", "in": "query", "schema": {
                            "type": "string", "enum": ["stdout", "stderr", "both"],
                            "default": "stdout"}},
                        {"name": "offset", "in": "query", "schema": {
                            "type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0},
                         "description": "byte offset to start each stream at"},
                        {"name": "stdout_offset", "in": "query", "schema": {
                            "type": "integer", "minimum": 0, "maximum": MAX_OFFSET},
                         "description": "byte offset for stdout alone (overrides offset)"},
                        {"name": "stderr_offset", "in": "query", "schema": {
                            "type": "integer", "minimum": 0, "maximum": MAX_OFFSET},
                         "description": "byte offset for stderr alone (overrides offset)"},
                        {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"},
                         "description": "the id of the last event received (stdout:N,stderr:M), "
                                        "as an EventSource sends on reconnecting: resumes both "
                                        "streams there when no offset is given"},
                        {"name": "follow", "in": "query", "schema": {
                            "type": "boolean", "default": False}}],
                    "responses": {
                        "200": {"description": "text, or server-sent events with "
                                               "Accept: text/event-stream (events stdout, stderr, "
                                               "dropped, and end: state, reason, exit_code, signal, "
                                               "duration_ms, error)",
                                "headers": {
                                    "X-Stdout-Offset": _header(
                                        "where stdout starts (later than asked when older "
                                        "bytes were dropped); with stream stdout or both",
                                        {"type": "integer", "minimum": 0}),
                                    "X-Stderr-Offset": _header(
                                        "where stderr starts; with stream stderr or both",
                                        {"type": "integer", "minimum": 0}),
                                    "X-Stdout-Dropped": _header(
                                        "oldest stdout bytes no longer kept",
                                        {"type": "integer", "minimum": 0}),
                                    "X-Stderr-Dropped": _header(
                                        "oldest stderr bytes no longer kept",
                                        {"type": "integer", "minimum": 0}),
                                    "X-Task-State": _header("the task's state when the "
                                                            "response began", _STATE,
                                                            required=True)},
                                "content": {"text/plain": {"schema": {"type": "string"}},
                                            "text/event-stream": {"schema": {"type": "string"}}}},
                        "400": _error("a bad parameter"), "404": _error("no such task"),
                        "429": _error("follow=true: 256 follow responses are open on the "
                                      "agent, or 64 for this token", retry_after=True),
                        **_REFUSED}}},
            **openapi_fleet.PATHS,
        },
    }
