"""One agent per data directory."""
from __future__ import annotations

import pytest

from agent.history.store import DataDirInUse
from tests.history.stores import new_store


def test_a_second_agent_cannot_share_a_data_dir(harness, tmp_path):
    with pytest.raises(DataDirInUse):
        new_store(tmp_path / "data").open()
