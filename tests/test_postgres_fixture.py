"""The suite's own PostgreSQL (tests/postgres.py, tests/conftest.py) does what the fleet
tests will lean on: the role agent logs in over TCP with its password and with no other,
a restart keeps the data and the port, a crash loses no committed row, each test gets a
database of its own, and no server process outlives a stop."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.postgres import PostgresError, PostgresServer, RunAs, find_binaries


def _uids(pids: list[int]) -> set[int]:
    uids = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                uids.update(int(u) for line in f if line.startswith("Uid:")
                            for u in line.split()[1:])
        except FileNotFoundError:  # a backend of a closed connection, just gone
            continue
    return uids


def test_agent_logs_in_over_tcp_with_its_password(postgres_server, fleet_dsn):
    params = conninfo_to_dict(fleet_dsn)
    assert params["host"] == "127.0.0.1" and params["password"] == postgres_server.password
    with psycopg.connect(fleet_dsn) as conn:
        user, port, database, over_tcp = conn.execute(
            "SELECT current_user, inet_server_port(), current_database(),"
            " inet_client_addr() IS NOT NULL").fetchone()
    assert (user, port, database, over_tcp) == (
        "agent", postgres_server.port, params["dbname"], True)


def test_the_url_form_reaches_the_same_server(postgres_server):
    with psycopg.connect(postgres_server.url) as conn:
        assert conn.execute("SELECT current_user, inet_server_port()").fetchone() == (
            "agent", postgres_server.port)


def test_a_wrong_or_missing_password_is_refused(postgres_server):
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(make_conninfo(postgres_server.dsn,
                                      password="not-" + postgres_server.password))
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        psycopg.connect(make_conninfo(postgres_server.dsn_without_password,
                                      passfile=os.devnull))


@pytest.mark.skipif(os.geteuid() != 0, reason="only root must hand the server to another user")
def test_as_root_the_server_runs_as_an_unprivileged_user(postgres_server):
    uids = _uids(postgres_server.processes())
    assert uids and 0 not in uids


def test_restart_keeps_committed_data_and_the_port(postgres_server, fleet_dsn):
    port = postgres_server.port
    with psycopg.connect(fleet_dsn) as conn:
        conn.execute("CREATE TABLE kept (n int)")
        conn.execute("INSERT INTO kept VALUES (1)")
    postgres_server.restart()
    assert postgres_server.port == port
    with psycopg.connect(fleet_dsn) as conn:
        assert conn.execute("SELECT n FROM kept").fetchall() == [(1,)]


def test_crash_kills_every_server_process_and_start_recovers_the_committed_row(
        postgres_server, fleet_dsn):
    with psycopg.connect(fleet_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE rows (what text)")
        conn.execute("INSERT INTO rows VALUES ('committed')")
    open_tx = psycopg.connect(fleet_dsn)
    open_tx.execute("INSERT INTO rows VALUES ('never committed')")
    log_size = postgres_server.log_path.stat().st_size

    postgres_server.crash()
    assert postgres_server.processes() == []
    with pytest.raises(psycopg.OperationalError):
        open_tx.execute("SELECT 1")
    open_tx.close()

    postgres_server.start()
    said = postgres_server.log_path.read_text()[log_size:]
    assert "not properly shut down; automatic recovery in progress" in said
    with psycopg.connect(fleet_dsn) as conn:
        assert conn.execute("SELECT what FROM rows").fetchall() == [("committed",)]


def test_each_test_has_a_fresh_database_and_drop_ends_its_connections(postgres_server):
    name = "fixture_test_create_drop"
    dsn = postgres_server.create_database(name)
    conn = psycopg.connect(dsn)
    assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                        ).fetchone() == (0,)
    conn.execute("CREATE TABLE mine (n int)")  # agent owns it, so may create in it
    conn.commit()

    postgres_server.drop_database(name)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    with postgres_server.admin_connect() as admin:
        assert admin.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                             (name,)).fetchone() is None


def test_a_new_server_on_the_same_dir_keeps_data_and_password_and_leaves_nothing(
        postgres_server):
    """As `make fleet` run twice would; postgres_server only for its skip-or-fail."""
    base_dir = Path(tempfile.mkdtemp(prefix="agent-test-pg-again-"))
    try:
        with PostgresServer(base_dir) as first:
            with psycopg.connect(first.dsn) as conn:
                conn.execute("CREATE TABLE kept AS SELECT 42 AS n")
            pids = first.processes()
        assert pids and first.processes() == []
        with PostgresServer(base_dir) as second:
            assert second.password == first.password
            with psycopg.connect(second.dsn) as conn:
                assert conn.execute("SELECT n FROM kept").fetchone() == (42,)
        assert second.processes() == []
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)


def _fake_bin(directory: Path) -> None:
    directory.mkdir(parents=True)
    for name in ("initdb", "postgres"):
        (directory / name).write_text("#!/bin/sh\n")
        (directory / name).chmod(0o755)


def test_binaries_come_from_path_first_else_from_the_newest_debian_version(tmp_path):
    for version in ("9.6", "13", "15", "README"):
        _fake_bin(tmp_path / "lib" / version / "bin")
    newest = find_binaries(search_path=str(tmp_path / "empty"), debian_root=tmp_path / "lib")
    assert newest.initdb == tmp_path / "lib" / "15" / "bin" / "initdb"
    _fake_bin(tmp_path / "on-path")
    on_path = find_binaries(search_path=str(tmp_path / "on-path"),
                            debian_root=tmp_path / "lib")
    assert on_path.postgres == tmp_path / "on-path" / "postgres"
    assert find_binaries(search_path="", debian_root=tmp_path / "none") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands base_dir to another user")
def test_a_base_dir_the_server_user_cannot_reach_is_refused_plainly():
    closed = Path(tempfile.mkdtemp(prefix="agent-test-closed-"))  # mode 0700, root's
    try:
        server = PostgresServer(closed / "pg", run_as=RunAs("nobody", 65534, 65534))
        with pytest.raises(PostgresError, match=f"'nobody'.* cannot enter {closed} "):
            server.start()
        assert not (closed / "pg" / "data").exists()
    finally:
        shutil.rmtree(closed)
