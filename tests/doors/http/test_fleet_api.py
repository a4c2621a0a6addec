"""GET /fleet/nodes, GET /fleet/tasks(/KEY), POST /fleet/tasks(/KEY/cancel): the fleet over a
fleet agent's HTTP door, in memory (StubTreq, a Clock) against a real PostgreSQL.

The fleet's state is made with the store's own functions (agent.fleet.nodes, tasks), as
nodes and submitters would make it; the door is asked about it."""
from __future__ import annotations

from urllib.parse import quote

import psycopg
import pytest

from agent.fleet import nodes, tasks
from agent.fleet.records import Report, Submission
from tests.doors.http.fleetdb import inline_fleet
from tests.doors.http.memory import MemoryApi, memory_api  # noqa: F401

LOCAL_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def fleet_api(tmp_path, fleet_dsn):
    api = MemoryApi(tmp_path / "data", fleet=inline_fleet(fleet_dsn))
    yield api
    api.close()


@pytest.fixture
def db(fleet_dsn, fleet_api):
    """A connection of our own, as a node or a submitter would have (the schema is in place)."""
    with psycopg.connect(fleet_dsn, autocommit=True) as conn:
        yield conn


def _node(db, node_id="node-a", http=None, labels=None, parallel=2) -> int:
    return nodes.register(db, node_id, labels or {}, parallel, 30.0, http, None).generation


def _finished(db, key="build-1", command=("make", "test"), node_id="node-a",
              http="http://node-a:8080", stdout=b"ok\n", code=0) -> None:
    """A task submitted, claimed by node_id and reported ended there."""
    generation = _node(db, node_id, http)
    tasks.submit(db, Submission(key, command), "token:someone")
    claimed = tasks.claim(db, node_id, generation, {}, 10)
    attempt = next(c.attempt for c in claimed if c.key == key)
    assert tasks.report(db, key, attempt, node_id, generation, Report(
        "exited", code, duration_ms=12.5, stdout_tail=stdout[-5:], stderr_tail=b"warn\n",
        stdout_bytes=len(stdout), stderr_bytes=5, local_task_id=LOCAL_ID)) == "recorded"


def _path(key: str) -> str:
    return "/fleet/tasks/" + quote(key, safe="")


# -- nodes

def test_nodes_lists_every_node_with_its_lease_and_address(fleet_api, db):
    _node(db, "node-a", "https://node-a:8080", {"os": "linux"}, parallel=4)
    generation = _node(db, "node-b")
    nodes.set_state(db, "node-b", generation, "stopped")

    listed = fleet_api.json("GET", "/fleet/nodes")["nodes"]

    assert [n["id"] for n in listed] == ["node-a", "node-b"]
    a, b = listed
    assert (a["state"], a["labels"], a["parallel"], a["running"], a["http"]) == \
        ("up", {"os": "linux"}, 4, 0, "https://node-a:8080")
    assert 0 <= a["heartbeat_age"] < 30 and a["lease_until"] > a["heartbeat_at"]
    assert a["ended_at"] is None and isinstance(a["generation"], int)
    assert (b["state"], b["http"]) == ("stopped", None) and b["ended_at"] is not None


# -- submitting

def test_a_submission_is_queued_with_its_key_and_who_sent_it(fleet_api, db):
    answer = fleet_api.request("POST", "/fleet/tasks", {
        "id": "build-1", "command": ["make", "test"], "timeout": 60, "labels": {"os": "linux"},
        "limits": {"nofile": 64}, "max_attempts": 2})

    assert answer.code == 201
    assert answer.header("Location") == ["/fleet/tasks/build-1"]
    task = answer.json()
    assert (task["key"], task["state"], task["command"], task["timeout"]) == \
        ("build-1", "queued", ["make", "test"], 60)
    assert (task["labels"], task["limits"], task["max_attempts"], task["attempt"]) == \
        ({"os": "linux"}, {"nofile": 64}, 2, 0)
    assert task["submitted_by"] == "token:admin" and task["attempts"] == []
    assert tasks.get(db, "build-1").state == "queued"


def test_a_submission_without_an_id_gets_a_key_of_its_own(fleet_api):
    task = fleet_api.json("POST", "/fleet/tasks", {"command": ["true"]}, expect=201)
    assert task["key"].startswith("fleet-") and len(task["key"]) == 6 + 32


def test_the_same_key_and_command_attaches_and_another_command_is_a_conflict(fleet_api, db):
    fleet_api.json("POST", "/fleet/tasks", {"id": "k", "command": ["echo", "1"]}, expect=201)

    again = fleet_api.request("POST", "/fleet/tasks", {"id": "k", "command": ["echo", "1"]})
    other = fleet_api.request("POST", "/fleet/tasks", {"id": "k", "command": ["echo", "2"]})

    assert again.code == 200 and again.header("Idempotent-Replayed") == ["true"]
    assert again.json()["key"] == "k"
    assert other.code == 409 and "already used by another command" in other.json()["error"]
    assert "echo" not in other.json()["error"]
    assert len(tasks.list_tasks(db)) == 1


INVALID = [
    ({"command": "make test"}, 422, '"command" must be a non-empty array'),
    ({"command": []}, 422, '"command" must be a non-empty array'),
    ({"command": ["x"], "max_attempts": 0}, 422, '"max_attempts"'),
    ({"command": ["x"], "timeout": -1}, 422, '"timeout"'),
    ({"command": ["x"], "labels": {"os": 7}}, 422, '"labels.os"'),
    ({"command": ["x"], "labels": {"os": "a\x00"}}, 422, "NUL"),
    ({"command": ["x"], "shell": True}, 422, "unknown field(s) 'shell'"),
    ({"command": ["x"], "id": "a\nb"}, 422, "control characters"),
    ({"command": ["x"], "id": "k" * 1001}, 422, "at most 1000"),
    (["x"], 400, "JSON object"),
]


def test_an_invalid_submission_is_refused_naming_the_field(fleet_api, db):
    for body, code, words in INVALID:
        answer = fleet_api.request("POST", "/fleet/tasks", body)
        assert answer.code == code and words in answer.json()["error"], (body, answer.json())
    assert tasks.list_tasks(db) == []


def test_a_body_that_is_not_json_is_a_400(fleet_api):
    answer = fleet_api.request("POST", "/fleet/tasks", raw=b"{nope")
    assert answer.code == 400 and "not valid JSON" in answer.json()["error"]


# -- one task

def test_a_task_shows_each_attempt_its_tails_and_where_its_whole_output_is(fleet_api, db):
    _finished(db, stdout=b"line 1\nline 2\n")

    task = fleet_api.json("GET", "/fleet/tasks/build-1")

    assert (task["state"], task["ending"], task["exit_code"], task["node_id"]) == \
        ("finished", "exited", 0, "node-a")
    assert task["stdout_tail"] == "ne 2\n" and task["stdout_bytes"] == 14
    assert task["stderr_tail"] == "warn\n" and task["stderr_bytes"] == 5
    assert task["duration_ms"] == 12.5 and task["local_task_id"] == LOCAL_ID
    assert task["output"] == {"node_id": "node-a", "local_task_id": LOCAL_ID,
                              "url": f"http://node-a:8080/tasks/{LOCAL_ID}/output"}
    [attempt] = task["attempts"]
    assert (attempt["attempt"], attempt["node_id"], attempt["ending"], attempt["exit_code"]) \
        == (1, "node-a", "exited", 0)
    assert attempt["started_at"] <= attempt["ended_at"]


def test_a_tail_that_is_not_utf8_is_shown_with_replacement_characters(fleet_api, db):
    _finished(db, stdout=b"\xff\xfeok")
    assert fleet_api.json("GET", "/fleet/tasks/build-1")["stdout_tail"] == "\ufffd\ufffdok"


def test_without_the_nodes_address_the_output_has_no_url(fleet_api, db):
    _finished(db, http=None)
    assert fleet_api.json("GET", "/fleet/tasks/build-1")["output"]["url"] is None


def test_an_attempt_handed_back_by_its_node_stays_in_the_record(fleet_api, db):
    generation = _node(db, "node-a")
    tasks.submit(db, Submission("k", ("sleep", "9")), None)
    [claim] = tasks.claim(db, "node-a", generation, {}, 1)
    tasks.give_back(db, "k", claim.attempt, "node-a", generation, "its node stopped")

    task = fleet_api.json("GET", "/fleet/tasks/k")

    assert task["state"] == "queued" and task["output"] is None
    assert [(a["attempt"], a["ending"], a["why"]) for a in task["attempts"]] == \
        [(1, "interrupted", "its node stopped")]


def test_any_key_is_reached_percent_encoded(fleet_api):
    for key in ["a/b", "with space", "ü-ñ", "100%", "?x=1#y", "..", "."]:
        created = fleet_api.request("POST", "/fleet/tasks", {"id": key, "command": ["true"]})
        location = created.header("Location")[0]
        assert location == (_path(key).replace(".", "%2E") if key in (".", "..") else _path(key))
        assert fleet_api.json("GET", location)["key"] == key
        assert fleet_api.json("POST", location + "/cancel")["state"] == "cancelled"


def test_an_unknown_key_is_a_404(fleet_api):
    for method, path in [("GET", "/fleet/tasks/nope"), ("GET", "/fleet/tasks/a%00b"),
                         ("GET", "/fleet/tasks/" + "k" * 1001),
                         ("POST", "/fleet/tasks/nope/cancel")]:
        answer = fleet_api.request(method, path)
        assert answer.code == 404 and "no fleet task with key" in answer.json()["error"], path


# -- the list

def test_the_list_is_newest_first_without_tails_and_filters_by_state_and_node(fleet_api, db):
    _finished(db, "done", node_id="node-a")
    tasks.submit(db, Submission("waiting", ("true",)), None)

    listed = fleet_api.json("GET", "/fleet/tasks")

    assert [t["key"] for t in listed["tasks"]] == ["waiting", "done"] and listed["next"] is None
    assert "stdout_tail" not in listed["tasks"][1] and listed["tasks"][1]["stdout_bytes"] == 3
    assert [t["key"] for t in fleet_api.json("GET", "/fleet/tasks?state=queued")["tasks"]] == \
        ["waiting"]
    assert [t["key"] for t in fleet_api.json("GET", "/fleet/tasks?node=node-a")["tasks"]] == \
        ["done"]
    assert fleet_api.json("GET", "/fleet/tasks?node=node-z")["tasks"] == []


def test_the_cursor_walks_every_page_once(fleet_api, db):
    for n in range(7):
        tasks.submit(db, Submission(f"t{n}", ("true",)), None)
    seen, cursor = [], None
    while True:
        page = fleet_api.json("GET", "/fleet/tasks?limit=3"
                              + ("" if cursor is None else f"&cursor={cursor}"))
        seen += [t["key"] for t in page["tasks"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == [f"t{n}" for n in reversed(range(7))]


def test_a_page_that_is_exactly_full_says_there_is_no_next(fleet_api, db):
    for n in range(3):
        tasks.submit(db, Submission(f"t{n}", ("true",)), None)
    assert fleet_api.json("GET", "/fleet/tasks?limit=3")["next"] is None


def test_a_bad_parameter_is_a_400_that_names_it(fleet_api):
    for query, words in [
            ("state=succeeded", "state must be one of"), ("limit=0", "limit must be between"),
            ("limit=x", "limit must be an integer"), ("cursor=-1", "cursor must be"),
            ("cursor=99999999999999999999", "cursor must be"), ("node=a%01b", "node must be")]:
        answer = fleet_api.request("GET", "/fleet/tasks?" + query)
        assert answer.code == 400 and words in answer.json()["error"], query


# -- cancel

def test_cancelling_a_queued_task_ends_it_at_once(fleet_api, db):
    tasks.submit(db, Submission("k", ("sleep", "9")), None)
    task = fleet_api.json("POST", "/fleet/tasks/k/cancel")
    assert (task["state"], task["ending"], task["exit_code"]) == ("cancelled", "cancelled", -1)


def test_cancelling_a_running_task_is_accepted_for_its_node_to_do(fleet_api, db):
    generation = _node(db, "node-a")
    tasks.submit(db, Submission("k", ("sleep", "9")), None)
    tasks.claim(db, "node-a", generation, {}, 1)

    task = fleet_api.json("POST", "/fleet/tasks/k/cancel", expect=202)

    assert task["state"] == "running" and task["cancel_requested_at"] is not None
    assert tasks.cancel_requested(db, "node-a", generation) == ["k"]


def test_cancelling_an_ended_task_leaves_it_as_it_was(fleet_api, db):
    _finished(db)
    task = fleet_api.json("POST", "/fleet/tasks/build-1/cancel")
    assert (task["state"], task["exit_code"]) == ("finished", 0)


# -- the database away

def test_with_the_database_down_each_endpoint_answers_503_and_recovers(fleet_api, db,
                                                                       postgres_server):
    tasks.submit(db, Submission("k", ("true",)), None)
    postgres_server.stop()
    requests = [("GET", "/fleet/nodes", None), ("GET", "/fleet/tasks", None),
                ("GET", "/fleet/tasks/k", None), ("POST", "/fleet/tasks", {"command": ["x"]}),
                ("POST", "/fleet/tasks/k/cancel", None)]
    for method, path, body in requests:
        answer = fleet_api.request(method, path, body)
        assert answer.code == 503, (method, path, answer.json())
        assert "fleet database cannot be reached" in answer.json()["error"]
        assert answer.header("Retry-After") == ["5"]
    assert fleet_api.fleet.down_since is not None

    postgres_server.start()
    assert fleet_api.json("GET", "/fleet/tasks/k")["state"] == "queued"
    assert fleet_api.fleet.down_since is None


# -- not in a fleet

@pytest.mark.parametrize("method, path", [
    ("GET", "/fleet/nodes"), ("GET", "/fleet/tasks"), ("POST", "/fleet/tasks"),
    ("GET", "/fleet/tasks/k"), ("POST", "/fleet/tasks/k/cancel")])
def test_an_agent_not_in_a_fleet_says_so_with_a_404(memory_api, method, path):
    answer = memory_api.request(method, path, {"command": ["true"]})
    assert answer.code == 404
    assert answer.json() == {"error": "this agent is not in a fleet (--fleet)"}
