"""The tasks table: a history written by an older agent opens with the columns added since."""
from __future__ import annotations

import sqlite3

import pytest_twisted

from tests.history.stores import new_store


@pytest_twisted.ensureDeferred
async def test_a_history_from_an_older_agent_gains_the_new_columns(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    old = sqlite3.connect(data / "history.sqlite3")
    old.executescript(
        "CREATE TABLE tasks (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
        "source TEXT NOT NULL, command TEXT NOT NULL, state TEXT NOT NULL, "
        "created_at REAL NOT NULL, started_at REAL, finished_at REAL, duration_ms REAL, "
        "exit_code INTEGER, error TEXT, pid INTEGER, stdout_bytes INTEGER NOT NULL, "
        "stderr_bytes INTEGER NOT NULL, stdout_dropped INTEGER NOT NULL, "
        "stderr_dropped INTEGER NOT NULL, timeout REAL, request_id TEXT, proc_start INTEGER, "
        "session INTEGER);"
        "INSERT INTO tasks (id, source, command, state, created_at, exit_code, error, "
        "stdout_bytes, stderr_bytes, stdout_dropped, stderr_dropped) VALUES "
        "('" + "a" * 32 + "', 'tcp', '[\"true\"]', 'succeeded', 1.0, 0, '', 0, 0, 0, 0);")
    old.commit()
    old.close()
    store = new_store(data).open()
    store.start()
    try:
        record = await store.get("a" * 32)
    finally:
        await store.close()
    assert (record.state, record.reason, record.cleanup) == ("succeeded", None, None)
