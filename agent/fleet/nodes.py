"""All SQL on the fleet's nodes: register, heartbeat (the lease), drain, stop, declare the
silent ones dead, read and prune. A node's lease is its heartbeat: its tasks are never
queued again while it renews it, however long they run."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from agent.fleet.records import NODE_COLUMNS, Node


class NodeIdInUse(Exception):
    """Another live agent holds this node id (its lease is valid and it is not us)."""


@dataclass(frozen=True)
class Registration:
    generation: int
    previous: int | None
    """The generation this node id had before, if any: its tasks are this node's to resume."""


def register(conn: psycopg.Connection, node_id: str, labels: dict, parallel: int,
             lease_seconds: float, http: str | None, mine: int | None) -> Registration:
    """Start (or restart) a node: a new generation, which fences every earlier one.

    mine: the generation this data dir registered last time. If the node id is held by
    a live lease of another generation, someone else runs with this id: NodeIdInUse."""
    with conn.transaction():
        row = conn.execute(
            """SELECT generation, state IN ('up', 'draining') AND lease_until >= now(),
                      extract(epoch FROM now() - heartbeat_at)::float8
               FROM agent_fleet_nodes WHERE node_id = %s FOR UPDATE""", (node_id,)).fetchone()
        if row is not None and row[1] and row[0] != mine:
            raise NodeIdInUse(
                f"node id {node_id!r} is held by a live agent (its last heartbeat was "
                f"{row[2]:.1f} s ago); give this agent another --node-id")
        generation = conn.execute("SELECT nextval('agent_fleet_generation')").fetchone()[0]
        conn.execute(
            """INSERT INTO agent_fleet_nodes (node_id, generation, labels, parallel, http, state,
                                             lease_until)
               VALUES (%(node)s, %(gen)s, %(labels)s, %(parallel)s, %(http)s, 'up',
                       now() + make_interval(secs => %(lease)s))
               ON CONFLICT (node_id) DO UPDATE SET
                   generation = EXCLUDED.generation, labels = EXCLUDED.labels,
                   parallel = EXCLUDED.parallel, http = EXCLUDED.http, state = 'up',
                   running = 0, started_at = now(), heartbeat_at = now(),
                   lease_until = EXCLUDED.lease_until, ended_at = NULL""",
            {"node": node_id, "gen": generation, "labels": Jsonb(labels), "parallel": parallel,
             "http": http, "lease": lease_seconds})
        return Registration(generation, None if row is None else row[0])


def heartbeat(conn: psycopg.Connection, node_id: str, generation: int, lease_seconds: float,
              running: int) -> bool:
    """Renew the lease; False when this generation is no longer the node's (declared dead,
    or replaced): the node must stop its fleet tasks and register again."""
    with conn.transaction():
        return bool(conn.execute(
            """UPDATE agent_fleet_nodes
               SET heartbeat_at = now(), lease_until = now() + make_interval(secs => %s),
                   running = %s
               WHERE node_id = %s AND generation = %s AND state IN ('up', 'draining')
                 AND lease_until >= now()""",
            (lease_seconds, running, node_id, generation)).rowcount)


def set_state(conn: psycopg.Connection, node_id: str, generation: int, state: str) -> bool:
    """'draining' (claims no more) or 'stopped' (a clean stop: its lease ends now)."""
    with conn.transaction():
        return bool(conn.execute(
            """UPDATE agent_fleet_nodes SET state = %s,
                   ended_at = CASE WHEN %s = 'stopped' THEN now() END,
                   lease_until = CASE WHEN %s = 'stopped' THEN now() ELSE lease_until END,
                   running = CASE WHEN %s = 'stopped' THEN 0 ELSE running END
               WHERE node_id = %s AND generation = %s""",
            (state, state, state, state, node_id, generation)).rowcount)


def declare_dead(conn: psycopg.Connection) -> list[str]:
    """Nodes whose lease ran out: dead. Their running tasks are for tasks.requeue_abandoned."""
    with conn.transaction():
        return [node for (node,) in conn.execute(
            """UPDATE agent_fleet_nodes SET state = 'dead', ended_at = now(), running = 0
               WHERE state IN ('up', 'draining') AND lease_until < now() RETURNING node_id""")]


def list_nodes(conn: psycopg.Connection, include_gone: bool = True) -> list[Node]:
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        where = "" if include_gone else "WHERE state IN ('up', 'draining')"
        cur.execute(f"SELECT {NODE_COLUMNS} FROM agent_fleet_nodes {where} ORDER BY node_id")
        return [Node.from_row(row) for row in cur.fetchall()]


def get(conn: psycopg.Connection, node_id: str) -> Node | None:
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {NODE_COLUMNS} FROM agent_fleet_nodes WHERE node_id = %s",
                    (node_id,))
        row = cur.fetchone()
        return None if row is None else Node.from_row(row)


def database_now(conn: psycopg.Connection) -> datetime:
    """The database's clock: a heartbeat's age is measured against the clock that wrote
    it, not the reader's (which may be off by more than a lease)."""
    with conn.transaction():
        return conn.execute("SELECT now()").fetchone()[0]


def prune(conn: psycopg.Connection, keep_days: float) -> int:
    """Forget nodes that stopped or died more than keep_days ago."""
    with conn.transaction():
        return conn.execute(
            """DELETE FROM agent_fleet_nodes WHERE state IN ('stopped', 'dead')
               AND ended_at < now() - make_interval(secs => %s)""",
            (keep_days * 86400.0,)).rowcount
