"""The OpenAPI document matches the routes the API really serves and the JSON it really sends.

Against the in-memory API (tests/doors/http/memory.py): the real site and store, fake children."""
from __future__ import annotations

import re


from agent.history.store import STATES
from agent.doors.http.body import TASK_FIELDS
from agent.doors.http.openapi import document
from tests.doors.http.memory import memory_api  # noqa: F401
from tests.webapi import TOKEN

SPEC = document()


def _operations(spec) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in spec["paths"].items()
            for method in item if method != "parameters"}


def test_documented_operations_are_exactly_the_routes(memory_api):
    served = {(route.method, route.pattern) for route in memory_api.site.resource.routes}
    assert _operations(SPEC) == served


OPEN = {("GET", "/healthz"), ("GET", "/"), ("GET", "/static/{name}")}
"""What needs no token: liveness, and the operator's page and its files (docs/dashboard.md)."""


def test_only_healthz_and_the_page_are_documented_without_the_token(memory_api):
    open_routes = {(r.method, r.pattern) for r in memory_api.site.resource.routes
                   if not r.auth}
    assert open_routes == OPEN
    for method, path in OPEN:
        assert SPEC["paths"][path][method.lower()]["security"] == []
    assert all("security" not in item.get(method, {})
               for path, item in SPEC["paths"].items()
               for method in item if method != "parameters" and (method.upper(), path) not in OPEN)


def test_every_documented_operation_refuses_a_missing_wrong_or_non_bearer_token(memory_api):
    """Driven by the document, so an endpoint added to the API cannot forget the token."""
    ended = memory_api.start("true")
    memory_api.finish(ended["id"])
    running = memory_api.start("sleep", "30")
    refusals = {"none": {}, "wrong": {"Authorization": f"Bearer {TOKEN}x"},
                "basic": {"Authorization": f"Basic {TOKEN}"},
                "empty": {"Authorization": "Bearer "}}
    guarded = sorted(_operations(SPEC) - OPEN)
    assert len(guarded) >= 8
    for method, path in guarded:
        for task in (ended, running):
            concrete = path.replace("{id}", task["id"])
            for query in ("", "?purge=true&follow=true"):
                for name, headers in refusals.items():
                    answer = memory_api.request(method, concrete + query,
                                                {"command": "touch", "args": ["/nonexistent/x"]},
                                                token=None, headers=headers)
                    assert answer.code == 401, (method, path, query, name, answer.code)
                    assert "error" in answer.json()
    assert len(memory_api.spawn.spawned) == 2, "a refused request started a task"
    assert running["pid"] not in dict(memory_api.kills.calls), "a refused request signalled"
    assert memory_api.json("GET", f"/tasks/{running['id']}")["state"] == "running"
    assert memory_api.json("GET", f"/tasks/{ended['id']}")["state"] == "succeeded"


def test_every_reference_resolves():
    text = repr(SPEC)
    for name in set(re.findall(r"#/components/schemas/(\w+)", text)):
        assert name in SPEC["components"]["schemas"], name


def test_states_and_request_fields_match_the_code():
    schemas = SPEC["components"]["schemas"]
    assert schemas["Task"]["properties"]["state"]["enum"] == list(STATES)
    assert tuple(schemas["NewTask"]["properties"]) == TASK_FIELDS


def test_the_task_schema_lists_exactly_the_fields_a_task_has(memory_api):
    record = memory_api.start("true")
    assert set(SPEC["components"]["schemas"]["Task"]["properties"]) == set(record)
    listed = memory_api.json("GET", "/tasks")
    assert set(SPEC["components"]["schemas"]["TaskPage"]["properties"]) == set(listed)
    health = memory_api.json("GET", "/healthz")
    assert set(SPEC["components"]["schemas"]["Health"]["properties"]) == set(health)


def test_each_documented_operation_answers_with_a_documented_status(memory_api):
    finished = memory_api.start("true")
    memory_api.finish(finished["id"])
    for method, path in sorted(_operations(SPEC)):
        running = memory_api.start("sleep", "30")
        concrete = path.replace("{id}", running["id"]).replace("{name}", "app.js")
        body = {"command": "true"} if method == "POST" else None
        sent = memory_api.send(method, concrete, body)
        memory_api.exit_all()  # what a cancel waits for, and what /run waits for
        code = memory_api.result(sent).code
        documented = SPEC["paths"][path][method.lower()]["responses"]
        assert str(code) in documented, (method, path, code)
        # not in a fleet, the fleet's paths answer a documented 404; in one, they succeed
        # (tests/doors/http/test_fleet_scopes_openapi.py)
        assert code < 300 or path.startswith("/fleet/"), (method, path, code)


def test_the_served_document_is_this_one(memory_api):
    assert memory_api.json("GET", "/openapi.json") == SPEC
