"""The fleet's endpoints behind the same scoped tokens as the rest of the API, and as the
OpenAPI document says: its statuses, its fields. In memory, against a real PostgreSQL."""
from __future__ import annotations

import hashlib

import psycopg
import pytest

from agent.doors.http.auth import Principal, TokenAuth
from agent.doors.http.openapi import document
from agent.fleet import nodes, tasks
from agent.fleet.records import STATES, Report, Submission
from agent.fleet.submissions import FIELDS
from tests.doors.http.fleetdb import inline_fleet
from tests.doors.http.memory import MemoryApi

SPEC = document()
READER = "reader-token-0123456789abcdefghijklmnop"
RUNNER = "runner-token-0123456789abcdefghijklmnop"
CANCELLER = "cancel-token-0123456789abcdefghijklmnop"
OTHER_RUNNER = "other-runner-0123456789abcdefghijklmnop"


def _principal(name, *scopes):
    return Principal(name, frozenset(scopes))


@pytest.fixture
def fleet_api(tmp_path, fleet_dsn):
    auth = TokenAuth({hashlib.sha256(token.encode()).digest(): principal for token, principal in [
        (READER, _principal("reader", "read")), (RUNNER, _principal("runner", "run")),
        (CANCELLER, _principal("canceller", "cancel")),
        (OTHER_RUNNER, _principal("other", "run"))]})
    api = MemoryApi(tmp_path / "data", fleet=inline_fleet(fleet_dsn), auth=auth)
    yield api
    api.close()


@pytest.fixture
def db(fleet_dsn, fleet_api):
    with psycopg.connect(fleet_dsn, autocommit=True) as conn:
        yield conn


SUBMIT = ("POST", "/fleet/tasks", {"id": "k", "command": ["true"]})
READS = [("GET", "/fleet/nodes", None), ("GET", "/fleet/tasks", None),
         ("GET", "/fleet/tasks/k", None)]
CANCEL = ("POST", "/fleet/tasks/k/cancel", None)


@pytest.mark.parametrize("token, allowed", [
    (READER, READS), (RUNNER, [SUBMIT]), (CANCELLER, [CANCEL])])
def test_each_endpoint_needs_its_scope(fleet_api, db, token, allowed):
    tasks.submit(db, Submission("k", ("true",)), "token:runner")
    for method, path, body in [SUBMIT, *READS, CANCEL]:
        answer = fleet_api.request(method, path, body, token=token)
        if (method, path, body) in allowed:
            assert answer.code < 300, (method, path, answer.json())
        else:
            assert answer.code == 403, (method, path, answer.code)
            assert "lacks the scope" in answer.json()["error"]


def test_a_token_that_may_not_read_attaches_only_to_its_own_submissions(fleet_api):
    fleet_api.json("POST", "/fleet/tasks", {"id": "mine", "command": ["true"]}, expect=201,
                   token=RUNNER)

    again = fleet_api.request("POST", "/fleet/tasks", {"id": "mine", "command": ["true"]},
                              token=RUNNER)
    theirs = fleet_api.request("POST", "/fleet/tasks", {"id": "mine", "command": ["true"]},
                               token=OTHER_RUNNER)

    assert again.code == 200 and again.json()["submitted_by"] == "token:runner"
    assert theirs.code == 403 and "did not submit and may not read" in theirs.json()["error"]


# -- the document

def _fleet_operations():
    return sorted((method.upper(), path) for path, item in SPEC["paths"].items()
                  if path.startswith("/fleet/") for method in item if method != "parameters")


def test_each_fleet_operation_answers_with_a_documented_success(tmp_path, fleet_dsn):
    api = MemoryApi(tmp_path / "data", fleet=inline_fleet(fleet_dsn))
    try:
        for n, (method, path) in enumerate(_fleet_operations()):
            key = f"key/{n}"
            api.json("POST", "/fleet/tasks", {"id": key, "command": ["true"]}, expect=201)
            concrete = path.replace("{key}", key.replace("/", "%2F"))
            body = {"command": ["true"]} if path == "/fleet/tasks" and method == "POST" else None
            code = api.request(method, concrete, body).code
            assert str(code) in SPEC["paths"][path][method.lower()]["responses"], (path, code)
            assert code < 300, (method, path, code)
    finally:
        api.close()


def test_the_fleet_schemas_list_exactly_the_fields_sent(fleet_api, db):
    generation = nodes.register(db, "node-a", {}, 1, 30.0, "http://a:1", None).generation
    tasks.submit(db, Submission("k", ("true",)), None)
    [claim] = tasks.claim(db, "node-a", generation, {}, 1)
    tasks.report(db, "k", claim.attempt, "node-a", generation,
                 Report("exited", 0, local_task_id="0" * 32))
    schemas = SPEC["components"]["schemas"]

    def fields(name):
        return set(schemas[name]["properties"])

    task = fleet_api.json("GET", "/fleet/tasks/k", token=READER)
    assert set(task) == fields("FleetTask")
    assert set(task["attempts"][0]) == fields("FleetAttempt")
    output_schema = schemas["FleetTask"]["properties"]["output"]["oneOf"][1]
    assert set(task["output"]) == set(output_schema["properties"])
    page = fleet_api.json("GET", "/fleet/tasks", token=READER)
    assert set(page) == fields("FleetTaskPage") and set(page["tasks"][0]) == fields(
        "FleetTaskSummary")
    listed = fleet_api.json("GET", "/fleet/nodes", token=READER)
    assert set(listed) == fields("FleetNodes") and set(listed["nodes"][0]) == fields("FleetNode")
    assert schemas["FleetTask"]["properties"]["state"]["enum"] == list(STATES)


def test_the_submission_schema_has_the_fields_the_store_reads():
    assert tuple(SPEC["components"]["schemas"]["NewFleetTask"]["properties"]) == FIELDS
