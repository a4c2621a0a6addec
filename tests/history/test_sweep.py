"""At start after a kill, output no record points to is removed; after a clean stop, nothing is looked at."""
from __future__ import annotations

import pytest_twisted

from tests.history.stores import create_history, insert_running, new_store


@pytest_twisted.ensureDeferred
async def test_output_no_record_points_to_is_removed_at_start(tmp_path):
    data = tmp_path / "d"
    create_history(data)
    insert_running(data, None, None, None)  # a task with a record ("a" * 32)
    for name in ("a" * 32, "b" * 32, "not-a-task"):
        (data / "output" / name).mkdir(parents=True)
        (data / "output" / name / "1").write_bytes(b"x" * 100)
    store = new_store(data).open()  # after a run that did not stop cleanly
    store.start()
    await store.close()
    assert sorted(p.name for p in (data / "output").iterdir()) == ["a" * 32, "not-a-task"]
    (data / "output" / ("c" * 32)).mkdir()
    store = new_store(data).open()  # after a clean stop: no sweep, nothing to find
    store.start()
    await store.close()
    assert ("c" * 32) in {p.name for p in (data / "output").iterdir()}
