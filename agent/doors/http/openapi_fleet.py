"""The fleet's part of the OpenAPI document: /fleet/nodes and /fleet/tasks (served by
agent.doors.http.fleet on an agent started with --fleet; 404 on any other)."""
from __future__ import annotations

from typing import Any

from agent.core.request import LIMIT_NAMES, MAX_ID
from agent.doors.http.openapi_shapes import (NO_CONTROL, NO_NUL, REFUSED, error, header,
                                             json_content, or_null)
from agent.doors.http.fleet import MAX_SEQ
from agent.fleet.records import STATES
from agent.fleet.submissions import MAX_ATTEMPTS, MAX_KEY

_TIME = {"type": "string", "format": "date-time"}
_MAYBE_TIME = {"type": ["string", "null"], "format": "date-time"}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}

NODE_PROPERTIES: dict[str, Any] = {
    "id": {"type": "string", "description": "the node id (--node-id)"},
    "state": {"type": "string", "enum": ["up", "draining", "stopped", "dead"]},
    "labels": _LABELS,
    "parallel": {"type": "integer", "description": "its --parallel; 0: unlimited"},
    "running": {"type": "integer", "description": "fleet tasks it ran at its last heartbeat"},
    "generation": {"type": "integer",
                   "description": "changes at each start of the node; fences older ones"},
    "http": {"type": ["string", "null"],
             "description": "its HTTP door's address (--fleet-url), if it gave one"},
    "started_at": _TIME,
    "heartbeat_at": _TIME,
    "heartbeat_age": {"type": "number", "minimum": 0,
                      "description": "seconds since its last heartbeat, by the database's clock"},
    "lease_until": {**_TIME, "description": "its tasks are queued again after this if it "
                                            "stays silent"},
    "ended_at": {**_MAYBE_TIME, "description": "when it stopped or was declared dead"},
}

SUMMARY_PROPERTIES: dict[str, Any] = {
    "key": {"type": "string", "description": "the fleet-wide key (the submission's id)"},
    "state": {"type": "string", "enum": list(STATES)},
    "command": {"type": "array", "items": {"type": "string"}, "description": "the argv"},
    "timeout": {"type": ["number", "null"], "description": "seconds"},
    "limits": {"type": "object", "additionalProperties": {"type": "integer"}},
    "labels": {**_LABELS, "description": "node labels it needs"},
    "attempt": {"type": "integer", "minimum": 0, "description": "attempts started so far"},
    "max_attempts": {"type": "integer", "minimum": 1},
    "node_id": {"type": ["string", "null"], "description": "the node of the last attempt"},
    "local_task_id": {"type": ["string", "null"],
                      "description": "the task's id on that node (GET /tasks/ID there)"},
    "submitted_by": {"type": ["string", "null"],
                     "description": "'token:NAME' over HTTP; the submitter's name otherwise"},
    "submitted_at": _TIME,
    "started_at": _MAYBE_TIME,
    "ended_at": _MAYBE_TIME,
    "cancel_requested_at": _MAYBE_TIME,
    "ending": {"type": ["string", "null"],
               "description": "how it ended: the node's reason (exited, signalled, timeout, "
                              "cancelled, output_cap, start_failed) or lost; null until then"},
    "exit_code": {"type": ["integer", "null"]},
    "error": {"type": ["string", "null"]},
    "duration_ms": {"type": ["number", "null"]},
    "stdout_bytes": {"type": ["integer", "null"],
                     "description": "every byte it wrote, of which the tail is the last 64 KiB"},
    "stderr_bytes": {"type": ["integer", "null"]},
}

ATTEMPT_PROPERTIES: dict[str, Any] = {
    "attempt": {"type": "integer", "minimum": 1},
    "node_id": {"type": "string"},
    "started_at": _TIME,
    "ended_at": _MAYBE_TIME,
    "ending": {"type": ["string", "null"],
               "description": "the node's reason, or interrupted (handed back by its node), "
                              "abandoned (its node's lease ran out)"},
    "exit_code": {"type": ["integer", "null"]},
    "why": {"type": ["string", "null"]},
}

OUTPUT_PROPERTIES: dict[str, Any] = {
    "node_id": {"type": "string"},
    "local_task_id": {"type": "string"},
    "url": {"type": ["string", "null"],
            "description": "GET it with a token of that node; null if the node gave no "
                           "--fleet-url"},
}

TASK_PROPERTIES: dict[str, Any] = {
    **SUMMARY_PROPERTIES,
    "stdout_tail": {"type": ["string", "null"],
                    "description": "the last 64 KiB of stdout, as UTF-8 (bytes that are not "
                                   "become U+FFFD)"},
    "stderr_tail": {"type": ["string", "null"]},
    "output": {"oneOf": [{"type": "null"}, {
        "type": "object", "properties": OUTPUT_PROPERTIES, "required": list(OUTPUT_PROPERTIES),
        "description": "where the whole output of the attempt that reported is"}]},
    "attempts": {"type": "array", "items": {"$ref": "#/components/schemas/FleetAttempt"}},
}

NEW_TASK_PROPERTIES: dict[str, Any] = {
    "id": or_null({"type": "string", "minLength": 1, "maxLength": min(MAX_KEY, MAX_ID),
                   "pattern": NO_CONTROL,
                   "description": "the key: one fleet task per key, fleet-wide; absent: a "
                                  "new one (fleet-HEX)"}),
    "command": {"type": "array", "minItems": 1, "items": {"type": "string", "pattern": NO_NUL},
                "description": "the argv; no shell"},
    "timeout": or_null({"type": "number", "minimum": 0,
                        "description": "seconds; 0 or absent: none"}),
    "limits": or_null({"type": "object", "additionalProperties": False,
                       "properties": {name: {"type": "integer", "minimum": 1}
                                      for name in LIMIT_NAMES}}),
    "labels": or_null({"type": "object",
                       "propertyNames": {"pattern": NO_NUL},
                       "additionalProperties": {"type": "string", "pattern": NO_NUL},
                       "description": "only nodes with every one of these labels run it"}),
    "max_attempts": {"type": "integer", "minimum": 1, "maximum": MAX_ATTEMPTS, "default": 3,
                     "description": "starts on some node before it is lost"},
}

SCHEMAS: dict[str, Any] = {
    "FleetNode": {"type": "object", "properties": NODE_PROPERTIES,
                  "required": list(NODE_PROPERTIES)},
    "FleetNodes": {"type": "object", "required": ["nodes"], "properties": {
        "nodes": {"type": "array", "items": {"$ref": "#/components/schemas/FleetNode"}}}},
    "FleetTaskSummary": {"type": "object", "properties": SUMMARY_PROPERTIES,
                         "required": list(SUMMARY_PROPERTIES)},
    "FleetAttempt": {"type": "object", "properties": ATTEMPT_PROPERTIES,
                     "required": list(ATTEMPT_PROPERTIES)},
    "FleetTask": {"type": "object", "properties": TASK_PROPERTIES,
                  "required": list(TASK_PROPERTIES)},
    "FleetTaskPage": {"type": "object", "required": ["tasks", "next"], "properties": {
        "tasks": {"type": "array", "items": {"$ref": "#/components/schemas/FleetTaskSummary"}},
        "next": {"type": ["string", "null"],
                 "description": "pass as ?cursor= for the next page"}}},
    "NewFleetTask": {"type": "object", "required": ["command"], "additionalProperties": False,
                     "properties": NEW_TASK_PROPERTIES},
}

_NOT_IN_A_FLEET = "the agent is not in a fleet (started without --fleet)"
_DOWN = {"503": error("the fleet database cannot be reached", retry_after=True)}
_KEY = {"name": "key", "in": "path", "required": True,
        "description": "the task's key, percent-encoded (a / as %2F)",
        "schema": {"type": "string", "minLength": 1}}
_TASK = {"description": "the task with its attempts", **json_content("FleetTask")}
_FROM_BODY = "$response.body#/key"
_LINKS = {"links": {
    "GetFleetTask": {"operationId": "getFleetTask", "parameters": {"key": _FROM_BODY}},
    "CancelFleetTask": {"operationId": "cancelFleetTask", "parameters": {"key": _FROM_BODY}}}}
_LOCATION = header("/fleet/tasks/KEY, the key percent-encoded", required=True)

PATHS: dict[str, Any] = {
    "/fleet/nodes": {"get": {
        "operationId": "listFleetNodes",
        "summary": "every node of the fleet (gone ones too, until pruned)",
        "responses": {"200": {"description": "the nodes", **json_content("FleetNodes")},
                      "404": error(_NOT_IN_A_FLEET), **_DOWN, **REFUSED}}},
    "/fleet/tasks": {
        "get": {
            "operationId": "listFleetTasks",
            "summary": "the fleet's tasks, newest first (without their output's tails)",
            "parameters": [
                {"name": "state", "in": "query", "schema": {"type": "string",
                                                            "enum": list(STATES)}},
                {"name": "node", "in": "query", "description": "only tasks whose last "
                                                               "attempt ran on this node",
                 "schema": {"type": "string", "minLength": 1, "maxLength": MAX_ID,
                            "pattern": NO_CONTROL}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1,
                                                            "maximum": 1000, "default": 50}},
                {"name": "cursor", "in": "query", "description": "a page's next, as it was sent",
                 "schema": {"type": "integer", "minimum": 0, "maximum": MAX_SEQ}}],
            "responses": {"200": {"description": "one page", **json_content("FleetTaskPage")},
                          "400": error("a bad parameter"), "404": error(_NOT_IN_A_FLEET),
                          **_DOWN, **REFUSED}},
        "post": {
            "operationId": "submitFleetTask",
            "summary": "queue a task for the fleet: a node whose labels match claims it",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/NewFleetTask"},
                "example": {"id": "nightly-42", "command": ["make", "test"], "timeout": 600,
                            "labels": {"os": "linux"}}}}},
            "responses": {
                "201": {**_TASK, "description": "queued", "headers": {"Location": _LOCATION},
                        **_LINKS},
                "200": {**_TASK, "description": "the task this key already names, with the "
                                                "same command: nothing new queued",
                        "headers": {"Location": _LOCATION, "Idempotent-Replayed": header(
                            "the answer is an earlier submission's task",
                            {"type": "string", "enum": ["true"]}, required=True)}, **_LINKS},
                "400": error("malformed JSON, or not an object"),
                "403": error("the token may not run tasks, or the key names a task it did "
                             "not submit and may not read"),
                "404": error(_NOT_IN_A_FLEET),
                "409": error("the key is used by a task with another command"),
                "413": error("body over 1 MiB"),
                "422": error("a field of the wrong type or value (the message names it)"),
                **_DOWN, **REFUSED}}},
    "/fleet/tasks/{key}": {
        "parameters": [_KEY],
        "get": {"operationId": "getFleetTask",
                "summary": "one fleet task: every attempt, the tails of its output, and "
                           "where the whole output is",
                "responses": {"200": _TASK, "404": error("no such task, or not in a fleet"),
                              **_DOWN, **REFUSED}}},
    "/fleet/tasks/{key}/cancel": {
        "parameters": [_KEY],
        "post": {"operationId": "cancelFleetTask",
                 "summary": "cancel a fleet task: a queued one at once, a running one by its "
                            "node (told within 2 s)",
                 "responses": {
                     "202": {**_TASK, "description": "running: its node has been told to "
                                                     "cancel it"},
                     "200": {**_TASK, "description": "ended: cancelled now (it was queued), "
                                                     "or it had ended already (left as it was)"},
                     "404": error("no such task, or not in a fleet"), **_DOWN, **REFUSED}}},
}
