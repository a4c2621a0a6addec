"""Fleet nodes in this process: agents as agent.service.build wires them (real engine,
history and processes, a TCP door on port 0), against the suite's real PostgreSQL, with
their database connections cuttable as a broken network would cut them."""
from __future__ import annotations

import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import fail
from twisted.internet.task import deferLater

from agent.fleet import tasks
from agent.fleet.database import Database, Unavailable
from agent.fleet.records import Submission
from agent.options import Options
from agent.service import build


class Cuttable:
    """A Database whose calls fail (Unavailable) while `cut`, as on a cut network."""

    def __init__(self, database: Database):
        self._database = database
        self.cut = False

    def run(self, f, *args, **kwargs):
        if self.cut:
            return fail(Unavailable("the test cut the network"))
        return self._database.run(f, *args, **kwargs)

    def close(self):
        return self._database.close()


class FleetNode:
    """One agent of the fleet; start() fires once it registered."""

    def __init__(self, dsn: str, data_dir: Path, node_id: str, *, parallel: int = 1,
                 lease: float = 2.0, poll: float = 0.5, labels: str = "",
                 shutdown_grace: float = 0.5, extra=()):
        options = Options(environ={})
        options.parseOptions([
            "--fleet", dsn, "--data-dir", str(data_dir), "--node-id", node_id,
            "--listen", "tcp:0:interface=127.0.0.1", "--parallel", str(parallel),
            "--fleet-lease", str(lease), "--fleet-poll", str(poll), "--labels", labels,
            "--shutdown-grace", str(shutdown_grace), "--log-tasks", "none", *extra])
        self.options = options
        self.node_id = node_id
        self.agent = build(options, reactor)
        self.door = self.agent.fleet
        self.beat = self.door.lease._beat = Cuttable(self.door.lease._beat)
        self.work = self.door._work = Cuttable(self.door._work)
        self.started: list[str] = []
        """Local ids of the fleet tasks this node started, in order."""
        self.agent.engine._observers += (self._saw,)
        self.stopped = False

    def _saw(self, task) -> None:
        if task.state == "running" and task.source == "fleet":
            self.started.append(task.request.id)

    def cut(self, beat: bool = True, work: bool = True) -> None:
        self.beat.cut, self.work.cut = beat, work

    def mend(self) -> None:
        self.beat.cut = self.work.cut = False

    def start(self):
        self.agent.privilegedStartService()
        self.agent.startService()
        return self.door.joined

    def stop(self):
        self.stopped = True
        return self.agent.stopService()


class Fleet:
    """A test's view of the database: submit, read, wait (queries on their own thread)."""

    def __init__(self, dsn: str):
        self.db = Database(reactor, dsn, "test")

    def submit(self, key: str, *command: str, **fields):
        return self.db.run(tasks.submit, Submission(key, command, **fields), "test")

    def submit_many(self, keyed_commands):
        """In one transaction: one NOTIFY wakes the nodes, not one per task."""
        batch = [Submission(key, tuple(command)) for key, command in keyed_commands]

        def insert(conn):
            with conn.transaction():
                for submission in batch:
                    tasks.submit(conn, submission, "test")
        return self.db.run(insert)

    def get(self, key: str):
        return self.db.run(tasks.get, key)

    def cancel(self, key: str):
        return self.db.run(tasks.cancel, key)

    def sql(self, query: str, *args):
        return self.db.run(lambda conn: conn.execute(query, args).fetchall())

    async def until(self, predicate, timeout: float = 20.0, what: str = "the condition"):
        """Await predicate() (a coroutine function) until truthy; its last value."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = await predicate()
            except Unavailable:  # the test restarted the database: ask again
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}: {value!r}")
            await sleep(0.05)

    async def state(self, key: str) -> str | None:
        task = await self.get(key)
        return None if task is None else task.state

    async def reaches(self, key: str, *states: str, timeout: float = 20.0):
        async def check():
            task = await self.get(key)
            return task if task is not None and task.state in states else None
        return await self.until(check, timeout, f"{key} to be {' or '.join(states)}")

    async def all_ended(self, count: int, timeout: float = 60.0):
        async def check():
            [(n,)] = await self.sql("SELECT count(*) FROM agent_fleet_tasks WHERE state IN "
                                    "('finished', 'cancelled', 'lost')")
            return n >= count
        await self.until(check, timeout, f"{count} tasks to end")

    def close(self):
        return self.db.close()


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)
