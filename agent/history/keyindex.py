"""Idempotency key -> task id, for every task in the history, outside Python's heap.

The engine asks synchronously, so the index lives in memory. It used to be
two dicts of str, and those strings were what kept the agent's RSS at its
peak after a burst: each key and task id is allocated among the burst's
short-lived objects, and one survivor pins a pymalloc pool (and its arena)
that would otherwise go back to the system. Held by an in-memory SQLite
database instead, the index lives in SQLite's own pages, compact and apart,
so the burst's memory can be given back once it ends (agent/memory.py,
tests/e2e/test_load.py).
"""
from __future__ import annotations

import sqlite3
from typing import Iterable


class KeyIndex:
    """Which task a request id (idempotency key) was submitted as; reactor thread only."""

    def __init__(self):
        self._db = sqlite3.connect(":memory:", isolation_level=None)
        self._db.executescript("""
            CREATE TABLE keys (key TEXT PRIMARY KEY, task_id TEXT NOT NULL) WITHOUT ROWID;
            CREATE INDEX keys_by_task ON keys (task_id);
        """)

    def load(self, pairs: Iterable[tuple[str, str]]) -> None:
        """(key, task id) pairs, oldest first: a later task with the same key wins."""
        self._in_one_transaction("INSERT OR REPLACE INTO keys VALUES (?, ?)", pairs)

    def remember(self, key: str, task_id: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO keys VALUES (?, ?)", (key, task_id))

    def task_for(self, key: str) -> str | None:
        row = self._db.execute("SELECT task_id FROM keys WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def forget(self, task_ids: Iterable[str]) -> None:
        """These tasks left the history: their keys may name a new task."""
        self._in_one_transaction("DELETE FROM keys WHERE task_id = ?", ((t,) for t in task_ids))

    def _in_one_transaction(self, statement: str, rows) -> None:
        self._db.execute("BEGIN")
        try:
            self._db.executemany(statement, rows)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM keys").fetchone()[0]
