"""A fleet Database whose calls run at once on the calling thread, against a real PostgreSQL.

For the in-memory HTTP tests (tests/doors/http/memory.py): every fleet call's Deferred has
fired by the time it is returned, so StubTreq gets its answer within the test's own call.
What it keeps of agent.fleet.database.Database is what the door relies on: each call on
the one connection, a lost or refused connection as Unavailable, the log of down and up.
"""
from __future__ import annotations

from functools import partial

import psycopg
from twisted.internet.defer import maybeDeferred, succeed

from agent.fleet import schema
from agent.fleet.database import Database


class InlineFleetDatabase(Database):
    def run(self, f, *args, **kwargs):
        return maybeDeferred(self._call, f, args, kwargs).addBoth(self._track)

    def close(self):
        self._drop()
        return succeed(None)


def inline_fleet(dsn: str):
    """What MemoryApi(fleet=...) takes: the door's fleet database on the API's clock, over
    a database whose schema is in place."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        schema.migrate(conn)
    return partial(InlineFleetDatabase, dsn=dsn, name="http")
