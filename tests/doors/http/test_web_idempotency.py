"""An id (the body's "id" or the Idempotency-Key header) starts one task; a repeat answers it
again. In memory (tests/doors/http/memory.py); tests/e2e/test_idempotency.py runs it for real."""
from __future__ import annotations

from tests.doors.http.memory import memory_api  # noqa: F401

KEY = {"Idempotency-Key": "deploy-7"}


def test_a_repeated_key_is_200_replayed_with_the_first_task_and_starts_nothing(memory_api):
    first = memory_api.request("POST", "/tasks", {"command": "deploy"}, headers=KEY)
    again = memory_api.request("POST", "/tasks", {"command": "deploy"}, headers=KEY)
    assert (first.code, first.header("Idempotent-Replayed")) == (201, None)
    assert (again.code, again.header("Idempotent-Replayed")) == (200, ["true"])
    assert again.header("Location") == first.header("Location")
    assert again.json()["id"] == first.json()["id"] and again.json()["request_id"] == "deploy-7"
    assert len(memory_api.spawn.spawned) == 1


def test_a_key_of_an_ended_task_replays_its_record(memory_api):
    created = memory_api.start("deploy", id="deploy-7")
    ended = memory_api.finish(created["id"], 2)
    replay = memory_api.request("POST", "/tasks", {"command": "deploy"}, headers=KEY)
    assert (replay.code, replay.header("Idempotent-Replayed")) == (200, ["true"])
    assert replay.json() == ended
    assert len(memory_api.spawn.spawned) == 1


def test_a_key_sent_again_with_another_command_is_422_and_starts_nothing(memory_api):
    created = memory_api.start("deploy", id="deploy-7")
    running = memory_api.json("POST", "/tasks", {"command": "true"}, expect=422, headers=KEY)
    memory_api.finish(created["id"])
    ended = memory_api.json("POST", "/tasks", {"command": "true"}, expect=422, headers=KEY)
    assert "another command" in running["error"] and "another command" in ended["error"]
    assert len(memory_api.spawn.spawned) == 1


def test_a_body_id_and_a_different_header_key_are_422(memory_api):
    body = memory_api.json("POST", "/tasks", {"command": "deploy", "id": "deploy-8"},
                           expect=422, headers=KEY)
    assert "differ" in body["error"]
    assert memory_api.spawn.spawned == []
