"""The OpenAPI document matches the routes the API really serves and the JSON it really sends."""
from __future__ import annotations

import re

import pytest_twisted

from agent.history.store import STATES
from agent.doors.http.body import TASK_FIELDS
from agent.doors.http.openapi import document
from tests.webapi import TOKEN, api  # noqa: F401

SPEC = document()


def _operations(spec) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in spec["paths"].items()
            for method in item if method != "parameters"}


def test_documented_operations_are_exactly_the_routes(api):
    served = {(route.method, route.pattern) for route in api.site.resource.routes}
    assert _operations(SPEC) == served


def test_only_healthz_is_documented_without_the_token(api):
    open_routes = {(r.method, r.pattern) for r in api.site.resource.routes
                   if not r.auth}
    assert open_routes == {("GET", "/healthz")}
    assert SPEC["paths"]["/healthz"]["get"]["security"] == []
    assert all("security" not in item.get(method, {})
               for path, item in SPEC["paths"].items() if path != "/healthz"
               for method in item if method != "parameters")


@pytest_twisted.ensureDeferred
async def test_every_documented_operation_refuses_a_missing_wrong_or_non_bearer_token(api):
    """Driven by the document, so an endpoint added to the API cannot forget the token."""
    ended = await api.start("true")
    await api.wait_for_state(ended["id"], "succeeded")
    running = await api.start("sleep", "30")
    refusals = {"none": {}, "wrong": {"Authorization": f"Bearer {TOKEN}x"},
                "basic": {"Authorization": f"Basic {TOKEN}"},
                "empty": {"Authorization": "Bearer "}}
    guarded = sorted(_operations(SPEC) - {("GET", "/healthz")})
    assert len(guarded) >= 8
    for method, path in guarded:
        for task in (ended, running):
            concrete = path.replace("{id}", task["id"])
            for query in ("", "?purge=true&follow=true"):
                for name, headers in refusals.items():
                    response = await api.request(method, concrete + query,
                                                 {"command": "touch", "args": ["/nonexistent/x"]},
                                                 token=None, headers=headers)
                    body = await response.json()
                    assert response.code == 401, (method, path, query, name, response.code)
                    assert "error" in body
    listed = await api.json("GET", "/tasks")
    assert sorted(t["id"] for t in listed["tasks"]) == sorted([ended["id"], running["id"]])
    assert (await api.json("GET", f"/tasks/{running['id']}"))["state"] == "running"


def test_every_reference_resolves():
    text = repr(SPEC)
    for name in set(re.findall(r"#/components/schemas/(\w+)", text)):
        assert name in SPEC["components"]["schemas"], name


def test_states_and_request_fields_match_the_code():
    schemas = SPEC["components"]["schemas"]
    assert schemas["Task"]["properties"]["state"]["enum"] == list(STATES)
    assert tuple(schemas["NewTask"]["properties"]) == TASK_FIELDS


@pytest_twisted.ensureDeferred
async def test_the_task_schema_lists_exactly_the_fields_a_task_has(api):
    record = await api.start("true")
    assert set(SPEC["components"]["schemas"]["Task"]["properties"]) == set(record)
    listed = await api.json("GET", "/tasks")
    assert set(SPEC["components"]["schemas"]["TaskPage"]["properties"]) == set(listed)
    health = await api.json("GET", "/healthz")
    assert set(SPEC["components"]["schemas"]["Health"]["properties"]) == set(health)


@pytest_twisted.ensureDeferred
async def test_each_documented_operation_answers_with_a_documented_status(api):
    finished = await api.start("true")
    await api.wait_for_state(finished["id"], "succeeded")
    for method, path in sorted(_operations(SPEC)):
        running = await api.start("sleep", "30")
        concrete = path.replace("{id}", running["id"])
        body = {"command": "true"} if method == "POST" else None
        response = await api.request(method, concrete, body)
        await response.content()
        documented = SPEC["paths"][path][method.lower()]["responses"]
        assert str(response.code) in documented, (method, path, response.code)
        assert response.code < 300, (method, path, response.code)


@pytest_twisted.ensureDeferred
async def test_the_served_document_is_this_one(api):
    assert await api.json("GET", "/openapi.json") == SPEC
