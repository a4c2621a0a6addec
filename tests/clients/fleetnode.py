"""A fleet node without an agent, for the submitter's tests against a real PostgreSQL: a
thread that claims tasks and reports each one finished through agent.fleet.tasks itself,
its stdout being the command's arguments (as echo), and goes on when PostgreSQL restarts."""
from __future__ import annotations

import threading
from collections import Counter

import psycopg

from agent.fleet import nodes, tasks
from agent.fleet.records import Claim, Report


class FakeNode:
    def __init__(self, dsn: str, node_id: str = "fake-node", budget: int | None = None,
                 batch: int = 50):
        """budget: how many tasks it may run before it waits for allow() (None: no end)."""
        self._dsn = dsn
        self.node_id = node_id
        self._batch = batch
        self._budget = budget
        self.runs: Counter[str] = Counter()
        """Times each key was run (a report sent for a new attempt)."""
        self.reconnects = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name=f"fake-{node_id}", daemon=True)
        self._generation: int | None = None
        self._unreported: list[Claim] = []

    def start(self) -> FakeNode:
        self._thread.start()
        return self

    def allow(self, budget: int | None) -> None:
        with self._lock:
            self._budget = budget

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the fake node did not stop"

    def _work(self) -> None:
        conn = None
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=5)
                    self._rejoin(conn)
                if not self._step(conn):
                    self._stop.wait(0.02)
            except psycopg.OperationalError:
                if conn is not None:
                    conn.close()
                    conn = None
                    self.reconnects += 1
                self._stop.wait(0.1)
        if conn is not None:
            conn.close()

    def _rejoin(self, conn) -> None:
        """Register once; after a reconnect, the claims whose answer was lost with the
        connection (the database has them running here) are ours to report."""
        if self._generation is None:
            self._generation = nodes.register(conn, self.node_id, {}, self._batch, 120.0,
                                              None, None).generation
            return
        known = {c.key for c in self._unreported}
        for key, attempt, generation, _ in tasks.running_on(conn, self.node_id):
            if generation == self._generation and key not in known:
                self._unreported.append(Claim(key, attempt, ("?",), None, (), None))

    def _step(self, conn) -> bool:
        """Report what is run, else claim more: False when there was nothing to do."""
        if self._unreported:
            claim = self._unreported[0]
            tasks.report(conn, claim.key, claim.attempt, self.node_id, self._generation,
                         _report_of(claim))
            self._unreported.pop(0)
            return True
        with self._lock:
            wanted = self._batch if self._budget is None else min(self._batch, self._budget)
        if wanted <= 0:
            return False
        claims = tasks.claim(conn, self.node_id, self._generation, {}, wanted)
        with self._lock:
            if self._budget is not None:
                self._budget -= len(claims)
        for claim in claims:
            self.runs[claim.key] += 1
        self._unreported.extend(claims)
        return bool(claims)


def _report_of(claim: Claim) -> Report:
    out = (" ".join(claim.command[1:]) + "\n").encode()
    return Report("exited", 0, duration_ms=1.0, stdout_tail=out, stdout_bytes=len(out),
                  local_task_id=f"fleet:{claim.attempt}:{claim.key}")
