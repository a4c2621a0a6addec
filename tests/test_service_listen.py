"""A door's listening service: start-up fails when its port is taken, and it says where it listens."""
from __future__ import annotations

import errno

import pytest
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor, RaisingMemoryReactor
from twisted.logger import capturedLogs, formatEvent

from agent.service import _door


def test_a_door_whose_port_is_taken_fails_start_up():
    taken = CannotListenError("127.0.0.1", 8080, OSError(errno.EADDRINUSE, "in use"))
    door = _door(RaisingMemoryReactor(listenException=taken), "tcp:8080:interface=127.0.0.1",
                 Factory(), "TCP task protocol")
    with pytest.raises(CannotListenError):
        door.privilegedStartService()


def test_a_door_says_where_it_listens_once_the_reactor_runs():
    reactor = MemoryReactor()
    door = _door(reactor, "tcp:0", Factory(), "HTTP API")
    with capturedLogs() as events:
        door.privilegedStartService()
        assert events == []  # not before the reactor's signal handlers are in place
        for hook, args, kwargs in reactor.whenRunningHooks:
            hook(*args, **kwargs)
    assert [formatEvent(event) for event in events] == ["HTTP API listening on 0.0.0.0:0"]
    assert len(reactor.tcpServers) == 1
