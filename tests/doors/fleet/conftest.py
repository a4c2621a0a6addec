from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList

from tests.doors.fleet.harness import Fleet, FleetNode


@pytest.fixture
def fleet(fleet_dsn):
    view = Fleet(fleet_dsn)
    yield view
    pytest_twisted.blockon(view.close())


@pytest.fixture
def make_node(fleet_dsn, tmp_path):
    """make_node(name, **options) -> a started FleetNode; every node is stopped at the end."""
    made: list[FleetNode] = []

    async def make(name: str, start: bool = True, **options) -> FleetNode:
        node = FleetNode(fleet_dsn, tmp_path / name, name, **options)
        made.append(node)
        if start:
            await node.start()
        return node
    yield make
    running = [node for node in made if not node.stopped]
    for node in running:
        node.mend()
    pytest_twisted.blockon(DeferredList([node.stop() for node in running], consumeErrors=True))
