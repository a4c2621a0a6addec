from __future__ import annotations

import pytest
import pytest_twisted

from tests.history.stores import Harness


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path / "data")
    yield h
    if h.store._database._thread.is_alive():
        pytest_twisted.blockon(h.store.close())
