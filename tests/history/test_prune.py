"""The database file gives pruned rows' pages back: a history from before is converted once."""
from __future__ import annotations

import sqlite3

import pytest_twisted

from agent.history.table import SCHEMA
from tests.history.stores import new_store


@pytest_twisted.ensureDeferred
async def test_a_history_from_an_older_agent_is_converted_to_incremental_vacuum(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    with sqlite3.connect(data / "history.sqlite3") as db:
        db.executescript(SCHEMA)
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    store = new_store(data).open()
    store.start()
    try:
        mode = await store._database.run(lambda c: c.execute("PRAGMA auto_vacuum").fetchone()[0])
        assert mode == 2
    finally:
        await store.close()
