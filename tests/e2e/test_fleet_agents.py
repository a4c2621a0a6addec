"""Real `twistd -n agent --fleet` agents and the suite's PostgreSQL, with faults injected:
kill -9, SIGSTOP past the lease, a cut network, a clean stop, a database restart. Each
test reads the promises back from the database and from /proc."""
from __future__ import annotations

import os
import signal
import time

import psycopg
import pytest

from agent.fleet import tasks
from agent.fleet.records import Submission
from tests.e2e.netcut import NetCut
from tests.procs import group_members, processes_where

LEASE = "3"  # seconds: short, so a dead node's tasks come back quickly


@pytest.fixture
def db(fleet_dsn):
    with psycopg.connect(fleet_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def fleet_agents(fleet_dsn, start_agent, tmp_path):
    """fleet_agents(n, dsn=...) -> {node id: AgentProcess}, each joined the fleet."""
    def start(n: int, dsn: str = fleet_dsn, first: int = 0, *extra: str):
        agents = {}
        for i in range(first, first + n):
            name = f"n{i}"
            agents[name] = start_agent(
                "--fleet", dsn, "--node-id", name, "--data-dir", str(tmp_path / name),
                "--fleet-lease", LEASE, "--fleet-poll", "0.5", "--parallel", "2",
                "--shutdown-grace", "1", *extra)
        for agent in agents.values():
            agent.wait_for_log("joined the fleet")
        return agents
    return start


def submit(db, key: str, *command: str, **fields):
    tasks.submit(db, Submission(key, command, **fields), "e2e")


def until(check, timeout: float = 30.0, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}: {value!r}")
        time.sleep(0.05)


def reaches(db, key: str, *states: str, timeout: float = 30.0):
    def check():
        task = tasks.get(db, key)
        return task if task is not None and task.state in states else None
    return until(check, timeout, f"{key} to be {'/'.join(states)}")


def task_groups(agent) -> set[int]:
    """The process groups of the agent's tasks: its session's members other than itself."""
    members = processes_where(3, agent.proc.pid)
    return {os.getpgid(pid) for pid in members if pid != agent.proc.pid
            and _alive(pid)} - {agent.proc.pid}


def _alive(pid: int) -> bool:
    try:
        os.getpgid(pid)
        return True
    except ProcessLookupError:
        return False


# a task with a grandchild in its group that would outlive a plain kill of the shell
WORK = ("sh", "-c", "sleep 300 & sleep 3; echo done")


def work_running_somewhere(db, agents):
    """Submit WORK as "job": (its running record, the agent running it, its task groups)."""
    submit(db, "job", *WORK)
    running = reaches(db, "job", "running")
    victim = agents[running.node_id]
    return running, victim, until(lambda: task_groups(victim), 10, "the task's group")


def test_kill_9_of_an_agent_ends_its_whole_task_group_and_another_node_runs_the_task(
        db, fleet_agents):
    running, victim, groups = work_running_somewhere(db, fleet_agents(5))
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(5)
    assert victim.survivors(timeout=5) == []  # the watchdog ended the group, grandchild too
    assert all(group_members(pgid) == [] for pgid in groups)
    done = reaches(db, "job", "finished", "lost")
    assert (done.state, done.stdout_tail, done.attempt) == ("finished", b"done\n", 2)
    assert done.node_id != running.node_id
    assert [(a.node_id, a.ending) for a in done.attempts] == [
        (running.node_id, "abandoned"), (done.node_id, "exited")]


def test_a_stopped_agent_s_tasks_die_before_the_task_runs_elsewhere_and_its_late_result_is_refused(
        db, fleet_agents):
    running, victim, groups = work_running_somewhere(db, fleet_agents(5))
    victim.proc.send_signal(signal.SIGSTOP)
    try:
        until(lambda: all(group_members(pgid) == [] for pgid in groups), 15,
              "the stopped agent's task group to be killed by its watchdog")
        group_died_at = time.time()
        second = until(lambda: (t := tasks.get(db, "job")).attempt == 2 and t.attempts[1], 15,
                       "the task to start on another node")
        assert group_died_at < second.started_at.timestamp() + 0.05  # (slack: polling)
    finally:
        victim.proc.send_signal(signal.SIGCONT)
    victim.wait_for_log("joined the fleet", count=2, timeout=15)  # a new generation
    done = reaches(db, "job", "finished")
    assert done.node_id != running.node_id and done.attempt == 2
    assert [a.node_id for a in done.attempts] == [running.node_id, done.node_id]
    assert "no longer holds this node's lease" in victim.log or "self-fence" in victim.log
    victim._wait_for(lambda: "was refused" in victim.log or "now stale" in victim.log, 10,
                     "the stale attempt's result to be refused")  # and the record kept b's
    assert tasks.get(db, "job").node_id == done.node_id


def test_cancel_by_key_from_a_submitter_ends_the_task_on_its_node(db, fleet_agents):
    agents = fleet_agents(5)
    submit(db, "long", "sleep", "300")
    running = reaches(db, "long", "running")
    groups = until(lambda: task_groups(agents[running.node_id]), 10, "the task's group")
    tasks.cancel(db, "long")
    done = reaches(db, "long", "cancelled", timeout=10)
    assert (done.ending, done.node_id) == ("cancelled", running.node_id)
    assert all(group_members(pgid) == [] for pgid in groups)


def test_a_clean_stop_drains_the_node_and_hands_its_task_to_another(db, fleet_agents):
    agents = fleet_agents(5)
    submit(db, "job", *WORK)
    running = reaches(db, "job", "running")
    victim = agents[running.node_id]
    assert victim.stop(signal.SIGTERM) == 0
    [(state,)] = db.execute("SELECT state FROM agent_fleet_nodes WHERE node_id = %s",
                            (running.node_id,)).fetchall()
    assert state == "stopped"
    done = reaches(db, "job", "finished")
    assert done.node_id != running.node_id and done.stdout_tail == b"done\n"
    assert [a.ending for a in done.attempts] == ["interrupted", "exited"]


def test_an_agent_that_finished_a_task_but_died_before_reporting_answers_from_its_history(
        db, fleet_dsn, start_agent, tmp_path, postgres_server):
    relay = NetCut(postgres_server.port)
    try:
        dsn = fleet_dsn.replace(f"port={postgres_server.port}", f"port={relay.port}")
        assert dsn != fleet_dsn
        args = ("--fleet", dsn, "--node-id", "solo", "--data-dir", str(tmp_path / "solo"),
                "--fleet-lease", "10", "--fleet-poll", "0.5")
        agent = start_agent(*args)
        agent.wait_for_log("joined the fleet")
        submit(db, "job", "sh", "-c", "sleep 1; echo ok")
        reaches(db, "job", "running")
        relay.cut()
        agent.wait_for_log("task fleet:1:job sh exited", timeout=10)
        time.sleep(1.0)  # its record reaches the history's disk (WRITE_DELAY), not the fleet
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait(5)
        relay.mend()
        again = start_agent(*args)
        again.wait_for_log("reported from the history (recorded)", timeout=15)
        done = reaches(db, "job", "finished")
        assert (done.attempt, done.exit_code, done.node_id) == (1, 0, "solo")
        assert "task fleet:" not in again.log  # nothing ran again after the restart
    finally:
        relay.close()


def test_postgresql_restarting_under_load_loses_and_duplicates_nothing(
        db, fleet_agents, postgres_server, fleet_dsn):
    agents = fleet_agents(5)
    for i in range(100):
        submit(db, f"t{i}", "sleep", "0.2")
    until(lambda: db.execute("SELECT count(*) FROM agent_fleet_tasks WHERE state = 'finished'"
                             ).fetchone()[0] >= 10, 30, "work under way")
    postgres_server.restart()
    with psycopg.connect(fleet_dsn, autocommit=True) as again:
        def ended():
            return again.execute("SELECT count(*) FROM agent_fleet_tasks WHERE state IN "
                                 "('finished', 'cancelled', 'lost')").fetchone()[0] == 100
        until(ended, 60, "every task to end")
        rows = again.execute("SELECT state, exit_code, attempt, count(*) FROM agent_fleet_tasks "
                             "GROUP BY 1, 2, 3").fetchall()
    assert rows == [("finished", 0, 1, 100)]
    for agent in agents.values():
        assert "unreachable" in agent.log and "reachable again" in agent.log
