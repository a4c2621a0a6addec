"""GET /openapi.json: the API described in OpenAPI 3.0; a test holds it to the real routes."""
from __future__ import annotations

from typing import Any

from agent.core.request import LIMIT_NAMES
from agent.core.outcome import REASONS
from agent.history.store import STATES

TASK_PROPERTIES: dict[str, Any] = {
    "id": {"type": "string", "description": "32 hex digits"},
    "command": {"type": "array", "items": {"type": "string"}, "description": "the argv"},
    "state": {"type": "string", "enum": list(STATES)},
    "source": {"type": "string", "enum": ["tcp", "http"]},
    "created_at": {"type": "string", "format": "date-time"},
    "started_at": {"type": "string", "format": "date-time", "nullable": True},
    "finished_at": {"type": "string", "format": "date-time", "nullable": True},
    "duration_ms": {"type": "number", "nullable": True},
    "exit_code": {"type": "integer", "nullable": True,
                  "description": "-1 when the agent ended the task or it never started"},
    "error": {"type": "string", "nullable": True,
              "description": "empty when the process exited on its own; null until it ended"},
    "pid": {"type": "integer", "nullable": True},
    "timeout": {"type": "number", "nullable": True, "description": "seconds"},
    "stdout_bytes": {"type": "integer", "description": "written so far, dropped ones included"},
    "stderr_bytes": {"type": "integer"},
    "stdout_dropped": {"type": "integer", "description": "oldest bytes not kept (--max-log-bytes)"},
    "stderr_dropped": {"type": "integer"},
    "request_id": {"type": "string", "nullable": True,
                   "description": "the TCP request's id or the HTTP Idempotency-Key"},
    "reason": {"type": "string", "nullable": True, "enum": [*REASONS, None],
               "description": "why it ended; null while it runs"},
    "signal": {"type": "integer", "nullable": True,
               "description": "the signal that killed it, when the agent did not send it"},
    "cleanup": {"type": "string", "nullable": True, "enum": ["complete", "incomplete", None],
                "description": "whether its process group was verified empty after the end"},
    "command_cut": {"type": "integer", "minimum": 0,
                    "description": "bytes of the command's JSON the record does not keep "
                                   "(past 64 KiB; the task itself got its whole argv)"},
    "launched_by": {"type": "string", "nullable": True,
                    "description": "who asked for it: 'token:NAME' over HTTP; over TCP "
                                   "'cert:SUBJECT' with client certificates, else 'tcp:HOST:PORT'"},
}

_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}


def _json(schema_name: str) -> dict:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}}}


def _error(description: str, retry_after: bool = False) -> dict:
    error = {"description": description, **_json("Error")}
    if retry_after:
        error["headers"] = {"Retry-After": {
            "description": "seconds after which a retry may succeed",
            "schema": {"type": "integer"}}}
    return error


_REFUSED = {"401": _error("no or a wrong bearer token"),
            "403": _error("the token lacks the scope this needs (the message names it)")}
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header", "schema": {"type": "string"},
    "description": "the task's id, as the body's id: a key the agent already knows starts "
                   "nothing; the answer is about the task it named (Idempotent-Replayed: true)"}
_BAD_TASK = {"400": _error("malformed JSON"), "413": _error("body over 1 MiB"),
             "422": _error("a field of the wrong type (the message names it), or a known "
                           "id/Idempotency-Key sent with a different command"),
             "429": _error("--max-running HTTP tasks are already running", retry_after=True),
             "403": _error("the command is not on the allow-list (command not allowed: ...), "
                           "the token may not run tasks, or the key names a task it may not read"),
             "503": _error("the task history cannot be written; nothing was started",
                           retry_after=True),
             "507": _error("the output of running tasks already fills --keep-bytes; nothing "
                           "was started", retry_after=True)}
_TASK = {"description": "the task", **_json("Task")}
_CANCEL_RESPONSES = {"200": {"description": "the cancelled task", **_json("Task")},
                     "404": _error("no such task"),
                     "409": _error("the task has already ended"), **_REFUSED}


def document() -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {"title": "agent HTTP API", "version": "1",
                 "description": "Run commands as long-running tasks, follow their output, "
                                "cancel them, and read the history of every task, "
                                "whichever door (TCP or HTTP) started it."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Task": {"type": "object", "properties": TASK_PROPERTIES,
                         "required": list(TASK_PROPERTIES)},
                "NewTask": {
                    "type": "object", "required": ["command"], "additionalProperties": False,
                    "properties": {
                        "command": {"type": "string", "description": "the program; no shell"},
                        "args": {"type": "array", "items": {"type": "string"}},
                        "timeout": {"type": "number", "minimum": 0,
                                    "description": "seconds; 0 or absent: none"},
                        "env": {"type": "object", "additionalProperties": {"type": "string"},
                                "description": "added to the agent's environment; not stored"},
                        "cwd": {"type": "string"},
                        "limits": {"type": "object", "additionalProperties": False,
                                   "description": "resource limits applied in the child, as on TCP",
                                   "properties": {name: {"type": "integer", "minimum": 1}
                                                  for name in LIMIT_NAMES}},
                        "max_output_bytes": {
                            "type": "integer", "minimum": 1,
                            "description": "end the task (reason output_cap) once it has written "
                                           "this many stdout bytes; absent: no cap, and "
                                           "--max-log-bytes keeps the newest output"},
                        "id": {"type": "string", "minLength": 1, "maxLength": 1024,
                               "description": "idempotency key (or the Idempotency-Key header): "
                                              "a task with a key the agent knows is not started "
                                              "again; the answer is that task"},
                    }},
                "TaskPage": {"type": "object", "required": ["tasks", "next"], "properties": {
                    "tasks": {"type": "array", "items": {"$ref": "#/components/schemas/Task"}},
                    "next": {"type": "string", "nullable": True,
                             "description": "pass as ?cursor= for the next page"}}},
                "Health": {"type": "object", "required": ["status", "running", "history"],
                           "properties": {
                    "status": {"type": "string", "enum": ["ok", "degraded"],
                               "description": "degraded while the history cannot be written"},
                    "running": {"type": "integer"},
                    "history": {"type": "object", "properties": {
                        "writable": {"type": "boolean"},
                        "error": {"type": "string", "nullable": True,
                                  "description": "why writing fails"},
                        "since": {"type": "string", "format": "date-time", "nullable": True},
                        "waiting": {"type": "integer",
                                    "description": "records kept in memory until they can be "
                                                   "written"},
                        "dropped": {"type": "integer",
                                    "description": "records given up (over 100000 waiting)"}}}}},
                "Error": {"type": "object", "required": ["error"],
                          "properties": {"error": {"type": "string"}}},
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": {
                "summary": "liveness; needs no token", "security": [],
                "responses": {"200": {"description": "up", **_json("Health")}}}},
            "/openapi.json": {"get": {
                "summary": "this document",
                "responses": {"200": {"description": "OpenAPI 3", "content": {
                    "application/json": {"schema": {"type": "object"}}}}, **_REFUSED}}},
            "/run": {"post": {
                "summary": "run a command to completion and answer with its stdout",
                "parameters": [_IDEMPOTENCY_KEY],
                "requestBody": {"required": True, **_json("NewTask")},
                "responses": {
                    "200": {"description": "stdout as text; X-Exit-Code, X-Task-Id, X-Task-State "
                                           "and (when something went wrong) X-Error headers",
                            "content": {"text/plain": {"schema": {"type": "string"}}}},
                    **_BAD_TASK, **_REFUSED}}},
            "/tasks": {
                "post": {
                    "summary": "start a task",
                    "parameters": [_IDEMPOTENCY_KEY],
                    "requestBody": {"required": True, **_json("NewTask")},
                    "responses": {"201": {**_TASK, "headers": {"Location": {
                        "schema": {"type": "string"}}}},
                        "200": {"description": "the task an earlier request with the same key "
                                               "started (running or ended); nothing new started",
                                **_json("Task"), "headers": {
                                    "Location": {"schema": {"type": "string"}},
                                    "Idempotent-Replayed": {"schema": {"type": "string"}}}},
                        **_BAD_TASK, **_REFUSED}},
                "get": {
                    "summary": "the history, newest first",
                    "parameters": [
                        {"name": "state", "in": "query", "schema": {"type": "string",
                                                                    "enum": list(STATES)}},
                        {"name": "limit", "in": "query",
                         "schema": {"type": "integer", "minimum": 1, "maximum": 1000,
                                    "default": 50}},
                        {"name": "cursor", "in": "query", "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "one page", **_json("TaskPage")},
                                  "400": _error("a bad parameter"), **_REFUSED}}},
            "/tasks/{id}": {
                "parameters": [_ID],
                "get": {"summary": "one task",
                        "responses": {"200": _TASK, "404": _error("no such task"), **_REFUSED}},
                "delete": {
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
                "post": {"summary": "kill the task's process group: SIGTERM, then SIGKILL after "
                                    "--kill-grace seconds; answers once it has ended",
                         "responses": _CANCEL_RESPONSES}},
            "/tasks/{id}/output": {
                "parameters": [_ID],
                "get": {
                    "summary": "the task's output; follow=true streams it until the task ends",
                    "parameters": [
                        {"name": "stream", "in": "query", "schema": {
                            "type": "string", "enum": ["stdout", "stderr", "both"],
                            "default": "stdout"}},
                        {"name": "offset", "in": "query", "schema": {
                            "type": "integer", "minimum": 0, "default": 0},
                         "description": "byte offset to start each stream at"},
                        {"name": "stdout_offset", "in": "query", "schema": {
                            "type": "integer", "minimum": 0},
                         "description": "byte offset for stdout alone (overrides offset)"},
                        {"name": "stderr_offset", "in": "query", "schema": {
                            "type": "integer", "minimum": 0},
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
                                    "X-Stdout-Offset": {"schema": {"type": "integer"},
                                                        "description": "where stdout starts"},
                                    "X-Stderr-Offset": {"schema": {"type": "integer"},
                                                        "description": "where stderr starts"},
                                    "X-Task-State": {"schema": {"type": "string"}}},
                                "content": {"text/plain": {"schema": {"type": "string"}},
                                            "text/event-stream": {"schema": {"type": "string"}}}},
                        "400": _error("a bad parameter"), "404": _error("no such task"),
                        **_REFUSED}}},
        },
    }
