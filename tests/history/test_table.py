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


@pytest_twisted.ensureDeferred
async def test_a_page_ends_early_past_its_bytes_and_the_cursor_goes_on_without_gaps(harness):
    from agent.history import table
    from tests.fakes import exit_with
    ids = []
    for n in range(5):
        ids.append(harness.submit("echo", "x" * 3000, str(n)).id)
        exit_with(harness.spawn.protocol())
    await harness.store.get(ids[-1])  # written
    seen, before, sizes = [], None, []
    while True:
        page = await harness.store._database.run(table.select_page, None, 100, before, 8000)
        sizes.append(len(page.records))
        seen += [r.id for r in page.records]
        if page.next is None:
            break
        before = int(page.next)
    assert seen == ids[::-1]
    assert max(sizes) == 2 and len(sizes) == 3, sizes


@pytest_twisted.ensureDeferred
async def test_a_page_always_holds_at_least_one_record(harness):
    from agent.history import table
    from tests.fakes import exit_with
    task = harness.submit("echo", "y" * 20_000)
    exit_with(harness.spawn.protocol())
    await harness.store.get(task.id)
    page = await harness.store._database.run(table.select_page, None, 10, None, 1)
    assert [r.id for r in page.records] == [task.id] and page.next is None
