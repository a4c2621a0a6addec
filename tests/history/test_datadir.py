"""A data dir only the agent can touch: private modes whatever the umask, unsafe dirs refused,
and no symlink under it ever followed (issue 15)."""
from __future__ import annotations

import os
import stat

import pytest
import pytest_twisted

from agent.history import datadir
from agent.history.datadir import UnsafeDataDir
from agent.history.prune import remove_output
from tests.history.stores import create_history, new_store


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def open_umask():
    """The umask most shells have: without explicit modes everything would be world-readable."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest_twisted.ensureDeferred
async def test_everything_the_history_creates_is_private_whatever_the_umask(tmp_path, open_umask,
                                                                            harness):
    task = harness.submit("sh", "-c", "echo secret")
    harness.spawn.protocol().childDataReceived(1, b"secret\n")
    data = tmp_path / "data"
    assert _mode(data) == 0o700
    assert _mode(data / "history.sqlite3") == 0o600
    assert _mode(data / "output") == 0o700
    assert _mode(data / "output" / task.id) == 0o700
    assert {_mode(p) for p in (data / "output" / task.id).iterdir()} == {0o600}
    await harness.store.close()
    assert {_mode(p) for p in data.iterdir() if p.is_file()} == {0o600}, \
        {p.name: oct(_mode(p)) for p in data.iterdir()}


def test_a_data_dir_others_can_write_is_refused_with_the_fix(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)
    with pytest.raises(UnsafeDataDir, match=f"chmod 700 {data}"):
        new_store(data).open()
    assert not (data / "history.sqlite3").exists(), "nothing is created in a refused dir"


def test_a_data_dir_of_another_user_is_refused(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    monkeypatch.setattr(datadir.os, "geteuid", lambda: os.stat(data).st_uid + 1)
    with pytest.raises(UnsafeDataDir, match="belongs to uid"):
        datadir.prepare(data)


@pytest_twisted.ensureDeferred
async def test_an_older_agents_open_files_are_made_private(tmp_path):
    data = tmp_path / "data"
    create_history(data)
    (data / "history.sqlite3").chmod(0o644)
    (data / "output").chmod(0o755)
    store = new_store(data).open()
    store.start()
    await store.close()
    assert (_mode(data / "history.sqlite3"), _mode(data / "output")) == (0o600, 0o700)


@pytest_twisted.ensureDeferred
async def test_the_orphan_sweep_removes_a_planted_symlink_not_what_it_points_to(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    data = tmp_path / "data"
    create_history(data)  # no clean-stop mark: the next open sweeps
    (data / "output" / ("f" * 32)).symlink_to(victim)
    store = new_store(data).open()
    store.start()
    await store.close()
    assert (victim / "precious").read_text() == "keep me"
    assert not os.path.lexists(data / "output" / ("f" * 32))


def test_removing_output_never_follows_a_link_inside_it_either(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    output = tmp_path / "output" / ("e" * 32)
    output.mkdir(parents=True)
    (output / "stdout.0").write_bytes(b"12345")
    (output / "stderr.0").symlink_to(victim / "precious")
    (output / "sub").symlink_to(victim)
    assert remove_output(output) >= 5
    assert not output.exists()
    assert (victim / "precious").read_text() == "keep me"


def test_a_symlink_in_place_of_the_output_dir_is_removed_as_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / ("d" * 32)).symlink_to(victim)
    assert remove_output(tmp_path / "output" / ("d" * 32)) == 0
    assert (victim / "precious").read_text() == "keep me"
    assert not os.path.lexists(tmp_path / "output" / ("d" * 32))
