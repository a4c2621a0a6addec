"""The fleet's tables, created or migrated at start: versioned, and safe when many agents
start at once (the migration runs under a transaction-scoped advisory lock)."""
from __future__ import annotations

import psycopg

LOCK_ID = 0x6167656E74  # "agent": one advisory lock id for the fleet's migrations

MIGRATIONS: tuple[str, ...] = (
    # 1: nodes with heartbeat leases, tasks as a queue and a history, one row per attempt.
    """
    CREATE TABLE agent_fleet_nodes (
        node_id      text PRIMARY KEY,
        generation   bigint NOT NULL,
        labels       jsonb NOT NULL DEFAULT '{}',
        parallel     integer NOT NULL,
        running      integer NOT NULL DEFAULT 0,
        http         text,
        state        text NOT NULL CHECK (state IN ('up', 'draining', 'stopped', 'dead')),
        started_at   timestamptz NOT NULL DEFAULT now(),
        heartbeat_at timestamptz NOT NULL DEFAULT now(),
        lease_until  timestamptz NOT NULL,
        ended_at     timestamptz
    );
    CREATE SEQUENCE agent_fleet_generation;
    CREATE TABLE agent_fleet_tasks (
        key              text PRIMARY KEY,
        seq              bigserial UNIQUE,
        command          jsonb NOT NULL,
        timeout          double precision,
        limits           jsonb NOT NULL DEFAULT '{}',
        labels           jsonb NOT NULL DEFAULT '{}',
        state            text NOT NULL
                         CHECK (state IN ('queued', 'running', 'finished', 'cancelled', 'lost')),
        attempt          integer NOT NULL DEFAULT 0,
        max_attempts     integer NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
        node_id          text,
        node_generation  bigint,
        submitted_by     text,
        submitted_at     timestamptz NOT NULL DEFAULT now(),
        started_at       timestamptz,
        ended_at         timestamptz,
        cancel_requested_at timestamptz,
        ending           text,
        exit_code        integer,
        error            text,
        duration_ms      double precision,
        stdout_tail      bytea,
        stderr_tail      bytea,
        stdout_bytes     bigint,
        stderr_bytes     bigint,
        local_task_id    text
    );
    CREATE INDEX agent_fleet_tasks_queued ON agent_fleet_tasks (seq) WHERE state = 'queued';
    CREATE INDEX agent_fleet_tasks_running ON agent_fleet_tasks (node_id)
        WHERE state = 'running';
    CREATE INDEX agent_fleet_tasks_ended ON agent_fleet_tasks (ended_at)
        WHERE ended_at IS NOT NULL;
    CREATE TABLE agent_fleet_attempts (
        key             text NOT NULL REFERENCES agent_fleet_tasks (key) ON DELETE CASCADE,
        attempt         integer NOT NULL,
        node_id         text NOT NULL,
        node_generation bigint NOT NULL,
        started_at      timestamptz NOT NULL DEFAULT now(),
        ended_at        timestamptz,
        ending          text,
        exit_code       integer,
        why             text,
        PRIMARY KEY (key, attempt)
    );
    """,
)
VERSION = len(MIGRATIONS)


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer agent: this one would misread it."""


def migrate(conn: psycopg.Connection) -> int:
    """Bring the schema to VERSION; returns the version found before. Agents starting
    together queue on the advisory lock, and each later one finds nothing left to do."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
        conn.execute("CREATE TABLE IF NOT EXISTS agent_fleet_schema (version integer NOT NULL)")
        row = conn.execute("SELECT version FROM agent_fleet_schema").fetchone()
        found = 0 if row is None else row[0]
        if found > VERSION:
            raise SchemaTooNew(f"the fleet database has schema version {found}; this agent "
                               f"knows up to {VERSION}: upgrade the agent")
        for sql in MIGRATIONS[found:]:
            conn.execute(sql)
        if row is None:
            conn.execute("INSERT INTO agent_fleet_schema VALUES (%s)", (VERSION,))
        elif found < VERSION:
            conn.execute("UPDATE agent_fleet_schema SET version = %s", (VERSION,))
        return found
