"""The fleet door against a real PostgreSQL: nodes in this process, real processes."""
from __future__ import annotations

import pytest_twisted
from twisted.logger import formatEvent, globalLogPublisher
from twisted.internet.defer import gatherResults
from twisted.internet.threads import deferToThread

from agent.fleet import tasks
from agent.fleet.database import Unavailable
from tests.doors.fleet.harness import sleep


@pytest_twisted.ensureDeferred
async def test_a_submitted_task_runs_on_a_node_and_its_result_is_recorded(fleet, make_node):
    node = await make_node("n1")
    await fleet.submit("hello", "sh", "-c", "echo out; echo err >&2; exit 3")
    task = await fleet.reaches("hello", "finished")
    assert (task.exit_code, task.ending, task.node_id) == (3, "exited", "n1")
    assert (task.stdout_tail, task.stderr_tail) == (b"out\n", b"err\n")
    assert (task.stdout_bytes, task.stderr_bytes) == (4, 4)
    assert node.started == ["fleet:1:hello"]
    record = await node.agent.store.get(task.local_task_id)
    assert record.request_id == "fleet:1:hello" and record.launched_by == "fleet:test"


@pytest_twisted.ensureDeferred
async def test_fifty_nodes_run_a_batch_with_each_task_once(fleet, make_node):
    nodes = [await make_node(f"n{i:02}", start=False, parallel=2, poll=0.3) for i in range(50)]
    await gatherResults([node.start() for node in nodes])
    await fleet.submit_many((f"t{i}", ("true",)) for i in range(400))
    await fleet.all_ended(400, timeout=120)
    rows = await fleet.sql("SELECT state, exit_code, attempt, count(*) FROM agent_fleet_tasks "
                           "GROUP BY 1, 2, 3")
    assert rows == [("finished", 0, 1, 400)]
    [(attempts,)] = await fleet.sql("SELECT count(*) FROM agent_fleet_attempts")
    assert attempts == 400
    started = [local for node in nodes for local in node.started]
    assert sorted(started) == sorted(f"fleet:1:t{i}" for i in range(400))
    assert sum(1 for node in nodes if node.started) >= 5  # spread, not one node doing it all


@pytest_twisted.ensureDeferred
async def test_a_node_claims_only_for_its_free_slots(fleet, make_node):
    node = await make_node("n1", parallel=2)
    for i in range(5):
        await fleet.submit(f"s{i}", "sleep", "30")
    await fleet.reaches("s1", "running")
    await sleep(1.0)  # a few polls
    [(running,)] = await fleet.sql("SELECT count(*) FROM agent_fleet_tasks WHERE state = "
                                   "'running'")
    assert running == 2 and len(node.started) == 2


@pytest_twisted.ensureDeferred
async def test_tasks_run_only_on_nodes_with_the_labels_they_ask_for(fleet, make_node):
    await make_node("plain")
    gpu = await make_node("gpu", labels="gpu=a100,os=linux")
    await fleet.submit("needs-gpu", "true", labels=(("gpu", "a100"),))
    task = await fleet.reaches("needs-gpu", "finished")
    assert task.node_id == "gpu" and gpu.started == ["fleet:1:needs-gpu"]


@pytest_twisted.ensureDeferred
async def test_cancel_from_anywhere_ends_the_running_task_on_its_node(fleet, make_node):
    node = await make_node("n1")
    await fleet.submit("long", "sleep", "60")
    await fleet.reaches("long", "running")
    await fleet.cancel("long")
    task = await fleet.reaches("long", "cancelled", timeout=10)
    assert task.ending == "cancelled" and task.error == "cancelled by a fleet request"
    assert node.agent.engine.live == {}


@pytest_twisted.ensureDeferred
async def test_a_node_that_cannot_renew_its_lease_stops_its_tasks_and_another_runs_them(
        fleet, make_node):
    a = await make_node("a", lease=1.5)
    await fleet.submit("job", "sh", "-c", "sleep 2; echo done")
    await fleet.reaches("job", "running")
    b = await make_node("b", lease=1.5)
    a.cut()  # the network to the database: no heartbeat, no report
    task = await fleet.reaches("job", "finished", timeout=20)
    assert (task.node_id, task.stdout_tail, task.attempt) == ("b", b"done\n", 2)
    first, second = task.attempts
    assert (first.node_id, first.ending) == ("a", "abandoned")
    local = await a.agent.store.get(a.agent.store.task_for_key("fleet:1:job"))
    assert local.ended and local.finished_at < second.started_at.timestamp()
    assert b.started == ["fleet:2:job"]
    a.mend()  # the late give-back of attempt 1 is refused: the attempt is b's now
    await sleep(1.0)
    task = await fleet.get("job")
    assert (task.state, task.node_id, task.attempt) == ("finished", "b", 2)


@pytest_twisted.ensureDeferred
async def test_a_clean_stop_hands_unfinished_tasks_to_another_node(fleet, make_node):
    a = await make_node("a", shutdown_grace=0.2)
    await fleet.submit("job", "sh", "-c", "sleep 3; echo done")
    await fleet.reaches("job", "running")
    b = await make_node("b")
    await a.stop()
    [(state,)] = await fleet.sql("SELECT state FROM agent_fleet_nodes WHERE node_id = 'a'")
    assert state == "stopped"
    task = await fleet.reaches("job", "finished", timeout=20)
    assert (task.node_id, task.stdout_tail) == ("b", b"done\n")
    assert [(x.node_id, x.ending) for x in task.attempts] == [("a", "interrupted"),
                                                              ("b", "exited")]
    assert b.started == ["fleet:2:job"]


@pytest_twisted.ensureDeferred
async def test_a_claim_whose_answer_was_lost_goes_back_unrun(fleet, make_node):
    node = await make_node("n1", start=False)
    await node.start()
    generation = node.door.lease.generation
    await fleet.submit("orphan", "true")
    # as if the claim committed and the connection broke before the answer came back
    node.door._claiming = True
    await fleet.db.run(tasks.claim, "n1", generation, {}, 1)
    node.door._claiming = False
    task = await fleet.reaches("orphan", "finished", timeout=20)
    assert task.attempt == 1 and node.started == ["fleet:1:orphan"]


@pytest_twisted.ensureDeferred
async def test_postgresql_restarting_under_load_loses_and_duplicates_nothing(
        fleet, make_node, postgres_server):
    nodes = [await make_node(f"n{i}", parallel=3, poll=0.3, lease=10.0) for i in range(5)]
    await fleet.submit_many((f"t{i}", ("sleep", "0.1")) for i in range(300))
    await fleet.until(_some_finished(fleet, 30), what="work under way")
    said = []
    globalLogPublisher.addObserver(said.append)
    try:
        await deferToThread(postgres_server.restart)
        [(ended_by_then,)] = await fleet.until(  # the test's own connection broke too
            lambda: fleet.sql("SELECT count(*) FROM agent_fleet_tasks WHERE state = 'finished'"))
        await fleet.all_ended(300, timeout=90)
    finally:
        globalLogPublisher.removeObserver(said)
    assert ended_by_then < 300  # the restart came while tasks were still running
    told = {formatEvent(event).split(":")[0] for event in said
            if event.get("log_namespace") == "agent.fleet.database"}
    assert "fleet database (work) unreachable" in told
    assert any(line.startswith("fleet database (work) reachable again") for line in told)
    rows = await fleet.sql("SELECT state, exit_code, count(*) FROM agent_fleet_tasks "
                           "GROUP BY 1, 2")
    assert rows == [("finished", 0, 300)]
    started = [local.split(":", 2)[2] for node in nodes for local in node.started]
    assert len(started) == len(set(started)) == 300  # each task started once, on one node


def _some_finished(fleet, count: int):
    async def check():
        try:
            [(n,)] = await fleet.sql("SELECT count(*) FROM agent_fleet_tasks "
                                     "WHERE state = 'finished'")
        except Unavailable:
            return False
        return n >= count
    return check


@pytest_twisted.ensureDeferred
async def test_a_node_prunes_the_fleet_tables_by_keep_days_when_it_joins(fleet, make_node):
    first = await make_node("first")
    await fleet.submit("old", "true")
    await fleet.submit("recent", "true")
    await fleet.reaches("old", "finished")
    await fleet.reaches("recent", "finished")
    await first.stop()
    await fleet.sql("UPDATE agent_fleet_tasks SET ended_at = now() - interval '3 days' "
                    "WHERE key = 'old' RETURNING key")
    await fleet.sql("UPDATE agent_fleet_nodes SET ended_at = now() - interval '3 days' "
                    "WHERE node_id = 'first' RETURNING node_id")
    await make_node("second", extra=("--keep-days", "2"))

    async def pruned():
        return await fleet.get("old") is None
    await fleet.until(pruned, 10, "the old task to be pruned")
    assert (await fleet.get("recent")).state == "finished"
    assert await fleet.sql("SELECT node_id FROM agent_fleet_nodes ORDER BY 1") == [("second",)]
