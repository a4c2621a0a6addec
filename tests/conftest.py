"""Fixtures for the whole suite: one real PostgreSQL for the session, a fresh database
per test (tests/postgres.py runs it).

Without PostgreSQL's binaries, or with a server that cannot start, the tests that need
it skip, except under CI (CI set), where .ci/run installs the binaries and such a
test fails instead: there a missing database is a broken build, not a reason to skip.
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.postgres import PostgresError, PostgresServer

_DATABASE_NUMBERS = itertools.count(1)


def _cannot_have_postgres(why: str):
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI is set: a test that needs PostgreSQL fails, never skips)",
                    pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL of the session's own, stopped at the end. Its base dir is made
    under the system's temporary directory, not pytest's: when we are root the server
    runs as another user, who cannot enter pytest's /tmp/pytest-of-root (mode 0700)."""
    if not PostgresServer.available():
        _cannot_have_postgres("needs PostgreSQL's initdb and postgres, on PATH or under "
                              "/usr/lib/postgresql/*/bin (apt-get install postgresql)")
    base_dir = Path(tempfile.mkdtemp(prefix="agent-test-pg-"))
    server = PostgresServer(base_dir)
    try:
        server.start()
    except (PostgresError, OSError) as e:
        shutil.rmtree(base_dir, ignore_errors=True)
        _cannot_have_postgres(f"the test PostgreSQL could not start: {e}")
    yield server
    server.stop()
    shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture
def fleet_dsn(postgres_server: PostgresServer, request) -> str:
    """The dsn (role agent, password included) of a new empty database, dropped after
    the test. A test that stopped or crashed the server finds it started again."""
    _running(postgres_server)
    slug = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:40]
    name = f"t{next(_DATABASE_NUMBERS)}_{slug}"
    dsn = postgres_server.create_database(name)
    yield dsn
    _running(postgres_server)
    postgres_server.drop_database(name)


def _running(server: PostgresServer) -> None:
    if not server.running:
        server.start()
