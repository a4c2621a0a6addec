"""All SQL on the fleet's tasks and their attempts: submit, claim, report (fenced), give
back, requeue the abandoned, cancel, read and prune. Each function runs one transaction on
a psycopg connection the caller owns (agent.fleet.database runs them off the reactor)."""
from __future__ import annotations

from typing import Iterable, Sequence

import psycopg
import psycopg.errors
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from agent.fleet.records import TASK_COLUMNS, Attempt, Claim, FleetTask, Report, Submission

QUEUED = "agent_fleet_queued"
"""NOTIFY channel: a task was queued (payload empty); idle nodes wake and claim."""
CANCEL = "agent_fleet_cancel"
"""NOTIFY channel: cancel asked for a running task (payload: its key)."""
ENDED = "agent_fleet_ended"
"""NOTIFY channel: a task ended (payload: its key); submitters waiting for it read it."""


class FleetKeyConflict(Exception):
    """The key is taken by a task with another command; the message does not show it."""

    def __init__(self, key: str):
        super().__init__(f"key {key!r} is already used by another command")
        self.key = key


def submit(conn: psycopg.Connection, task: Submission, submitted_by: str | None
           ) -> tuple[FleetTask, bool]:
    """Queue a task, or attach to the one its key names if the command is the same;
    (task, True) when it is new. Raises FleetKeyConflict for another command."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"""INSERT INTO agent_fleet_tasks
                    (key, command, timeout, limits, labels, max_attempts, submitted_by, state)
                VALUES (%s, %s, %s, %s, %s, %s, %s, 'queued')
                ON CONFLICT (key) DO NOTHING RETURNING {TASK_COLUMNS}""",
            (task.key, Jsonb(list(task.command)), task.timeout, Jsonb(dict(task.limits)),
             Jsonb(dict(task.labels)), task.max_attempts, submitted_by))
        row = cur.fetchone()
        if row is not None:
            cur.execute("SELECT pg_notify(%s, '')", (QUEUED,))
            return FleetTask.from_row(row), True
        cur.execute(f"SELECT {TASK_COLUMNS} FROM agent_fleet_tasks WHERE key = %s", (task.key,))
        row = cur.fetchone()
    if row is None:  # pruned between the two statements: try again, it is free now
        return submit(conn, task, submitted_by)
    existing = FleetTask.from_row(row)
    if not existing.is_command(task.command):
        raise FleetKeyConflict(task.key)
    return existing, False


DEADLOCK_RETRIES = 5


def submit_many(conn: psycopg.Connection, batch: Sequence[Submission], submitted_by: str | None
                ) -> list[str]:
    """submit for a batch in one transaction and one INSERT (a submitter's thousands of
    tasks cost a round trip per batch, not per task): for each submission, in order,
    'created', 'attached' (its key names a task with the same command) or 'conflict'
    (another command: that task is left as it is). The same key twice in a batch is
    created once and attached (or refused) after. Tasks are queued in batch order."""
    for retry in range(DEADLOCK_RETRIES + 1):
        try:
            answers = _submit_batch(conn, batch, submitted_by)
            break
        except psycopg.errors.DeadlockDetected:
            # Two submitters inserting the same keys in different orders: the whole
            # transaction was rolled back, so trying again is safe.
            if retry == DEADLOCK_RETRIES:
                raise
    gone = [i for i, answer in enumerate(answers) if answer is None]
    if gone:  # pruned between our two statements: the keys are free now
        again = submit_many(conn, [batch[i] for i in gone], submitted_by)
        for i, answer in zip(gone, again):
            answers[i] = answer
    return answers


def _submit_batch(conn, batch: Sequence[Submission], submitted_by: str | None
                  ) -> list[str | None]:
    if not batch:
        return []
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(
            """INSERT INTO agent_fleet_tasks
                   (key, command, timeout, limits, labels, max_attempts, submitted_by, state)
               SELECT key, command, timeout, limits, labels, max_attempts, %s, 'queued'
               FROM unnest(%s::text[], %s::jsonb[], %s::float8[], %s::jsonb[], %s::jsonb[],
                           %s::int[])
                    WITH ORDINALITY AS s(key, command, timeout, limits, labels, max_attempts, n)
               ORDER BY n
               ON CONFLICT (key) DO NOTHING RETURNING key""",
            (submitted_by, [t.key for t in batch], [Jsonb(list(t.command)) for t in batch],
             [t.timeout for t in batch], [Jsonb(dict(t.limits)) for t in batch],
             [Jsonb(dict(t.labels)) for t in batch], [t.max_attempts for t in batch]))
        created = {key for (key,) in cur.fetchall()}
        known = {}
        others = list({t.key for t in batch} - created)
        if others:
            cur.execute("SELECT key, command FROM agent_fleet_tasks WHERE key = ANY(%s)",
                        (others,))
            known = {key: tuple(command) for key, command in cur.fetchall()}
        if created:
            cur.execute("SELECT pg_notify(%s, '')", (QUEUED,))
    answers: list[str | None] = []
    for t in batch:
        if t.key in created and t.key not in known:
            known[t.key] = tuple(t.command)
            answers.append("created")
        elif t.key not in known:
            answers.append(None)
        else:
            answers.append("attached" if known[t.key] == tuple(t.command) else "conflict")
    return answers


def claim(conn: psycopg.Connection, node_id: str, generation: int, labels: dict, limit: int
          ) -> list[Claim]:
    """Up to `limit` queued tasks whose labels the node has, oldest first, now running
    on this node as their next attempt; none unless the node's lease is valid (a node
    that was declared dead must register again before it claims)."""
    with conn.transaction():
        return _claim(conn, node_id, generation, labels, limit)


def _claim(conn, node_id: str, generation: int, labels: dict, limit: int) -> list[Claim]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            """WITH node AS (
                   SELECT 1 FROM agent_fleet_nodes
                   WHERE node_id = %(node)s AND generation = %(gen)s AND state = 'up'
                     AND lease_until > now()),
               picked AS (
                   SELECT key FROM agent_fleet_tasks
                   WHERE state = 'queued' AND labels <@ %(labels)s AND EXISTS (SELECT 1 FROM node)
                   ORDER BY seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED),
               claimed AS (
                   UPDATE agent_fleet_tasks t
                   SET state = 'running', attempt = t.attempt + 1, node_id = %(node)s,
                       node_generation = %(gen)s, started_at = now(), local_task_id = NULL
                   FROM picked WHERE t.key = picked.key
                   RETURNING t.key, t.attempt, t.command, t.timeout, t.limits, t.submitted_by,
                             t.seq),
               noted AS (
                   INSERT INTO agent_fleet_attempts (key, attempt, node_id, node_generation)
                   SELECT key, attempt, %(node)s, %(gen)s FROM claimed)
               SELECT * FROM claimed ORDER BY seq""",
            {"node": node_id, "gen": generation, "labels": Jsonb(labels), "limit": limit})
        return [Claim(row["key"], row["attempt"], tuple(row["command"]), row["timeout"],
                      tuple(sorted(row["limits"].items())), row["submitted_by"])
                for row in cur.fetchall()]


def release(conn: psycopg.Connection, key: str, attempt: int, node_id: str) -> bool:
    """A claim the node could not start (its slot was taken meanwhile, it is stopping):
    queued again as if never claimed, so it costs no attempt."""
    with conn.transaction():
        cur = conn.execute(
            """UPDATE agent_fleet_tasks
               SET state = 'queued', attempt = attempt - 1, node_id = NULL,
                   node_generation = NULL, started_at = NULL
               WHERE key = %s AND attempt = %s AND node_id = %s AND state = 'running'""",
            (key, attempt, node_id))
        if cur.rowcount:
            conn.execute("DELETE FROM agent_fleet_attempts WHERE key = %s AND attempt = %s",
                         (key, attempt))
            conn.execute("SELECT pg_notify(%s, '')", (QUEUED,))
        return bool(cur.rowcount)


_MY_ATTEMPT = """key = %(key)s AND attempt = %(attempt)s AND node_id = %(node)s
                 AND node_generation = %(gen)s AND state = 'running'"""
"""The attempt is still this node's (this generation of it) and running."""

_STILL_MINE = _MY_ATTEMPT + """
                 AND EXISTS (SELECT 1 FROM agent_fleet_nodes n
                             WHERE n.node_id = %(node)s AND n.generation = %(gen)s
                               AND n.state IN ('up', 'draining') AND n.lease_until >= now())"""
"""The fence: the attempt is still this node's, and the node's lease has not run out."""


def report(conn: psycopg.Connection, key: str, attempt: int, node_id: str, generation: int,
           result: Report) -> str:
    """Record an attempt's result: 'recorded'; 'already' when this very result was
    recorded before (a retry after a lost connection); 'stale' when the attempt is no
    longer this node's (its lease ran out, the task was queued again): refused."""
    with conn.transaction():
        return _report(conn, key, attempt, node_id, generation, result)


def report_and_claim(conn: psycopg.Connection, key: str, attempt: int, node_id: str,
                     generation: int, result: Report, claim_generation: int, labels: dict,
                     limit: int) -> tuple[str, list[Claim]]:
    """A node's task ended and its slot is free: the result and the next claim in one
    transaction, so a busy node pays one commit a task, not two."""
    with conn.transaction():
        return (_report(conn, key, attempt, node_id, generation, result),
                _claim(conn, node_id, claim_generation, labels, limit))


def _report(conn, key: str, attempt: int, node_id: str, generation: int, result: Report) -> str:
    fence = {"key": key, "attempt": attempt, "node": node_id, "gen": generation}
    cur = conn.execute(
        f"""UPDATE agent_fleet_tasks
            SET state = %(state)s, ended_at = now(), ending = %(ending)s,
                exit_code = %(exit_code)s, error = %(error)s, duration_ms = %(duration)s,
                stdout_tail = %(stdout)s, stderr_tail = %(stderr)s,
                stdout_bytes = %(stdout_bytes)s, stderr_bytes = %(stderr_bytes)s,
                local_task_id = %(local)s
            WHERE {_STILL_MINE}""",
        dict(fence, state="cancelled" if result.cancelled else "finished",
             ending=result.ending, exit_code=result.exit_code, error=result.error,
             duration=result.duration_ms, stdout=result.stdout_tail,
             stderr=result.stderr_tail, stdout_bytes=result.stdout_bytes,
             stderr_bytes=result.stderr_bytes, local=result.local_task_id))
    if cur.rowcount:
        _end_attempt(conn, key, attempt, result.ending, result.exit_code, result.error)
        conn.execute("SELECT pg_notify(%s, %s)", (ENDED, key))
        return "recorded"
    row = conn.execute(
        """SELECT 1 FROM agent_fleet_tasks WHERE key = %s AND attempt = %s AND node_id = %s
           AND state IN ('finished', 'cancelled') AND local_task_id IS NOT DISTINCT FROM %s""",
        (key, attempt, node_id, result.local_task_id)).fetchone()
    return "already" if row is not None else "stale"


def give_back(conn: psycopg.Connection, key: str, attempt: int, node_id: str, generation: int,
              why: str) -> str:
    """An attempt this node started and could not finish (it is stopping, it lost its
    lease): queued again for another node, or 'lost' once max_attempts have started.
    Returns the task's new state, or 'stale' if the attempt was no longer this node's."""
    fence = {"key": key, "attempt": attempt, "node": node_id, "gen": generation}
    with conn.transaction():
        row = conn.execute(
            f"""UPDATE agent_fleet_tasks SET {_AGAIN_OR_LOST}
                WHERE {_MY_ATTEMPT} RETURNING state""",
            dict(fence, why=why)).fetchone()
        if row is None:
            return "stale"
        _end_attempt(conn, key, attempt, "interrupted", None, why)
        _announce(conn, key, row[0])
        return row[0]


_AGAIN_OR_LOST = """
    state = CASE WHEN attempt >= max_attempts THEN 'lost' ELSE 'queued' END,
    ended_at = CASE WHEN attempt >= max_attempts THEN now() END,
    ending = CASE WHEN attempt >= max_attempts THEN 'lost' END,
    exit_code = CASE WHEN attempt >= max_attempts THEN -1 END,
    error = CASE WHEN attempt >= max_attempts
                 THEN 'started ' || attempt || ' time(s), never finished: ' || %(why)s END,
    node_id = CASE WHEN attempt >= max_attempts THEN node_id END,
    started_at = CASE WHEN attempt >= max_attempts THEN started_at END"""
"""A started attempt that will not finish: the task waits for another node, or is lost."""


def _end_attempt(conn, key: str, attempt: int, ending: str, exit_code: int | None,
                 why: str | None) -> None:
    conn.execute("""UPDATE agent_fleet_attempts SET ended_at = now(), ending = %s,
                    exit_code = %s, why = %s WHERE key = %s AND attempt = %s""",
                 (ending, exit_code, why or None, key, attempt))


def _announce(conn, key: str, state: str) -> None:
    channel = QUEUED if state == "queued" else ENDED
    conn.execute("SELECT pg_notify(%s, %s)", (channel, "" if state == "queued" else key))


def requeue_abandoned(conn: psycopg.Connection) -> list[tuple[str, str]]:
    """Every running task whose node (that generation of it) has no valid lease any more:
    queued again, or lost after max_attempts. Returns (key, new state) pairs."""
    with conn.transaction():
        rows = conn.execute(
            f"""UPDATE agent_fleet_tasks t SET {_AGAIN_OR_LOST}
                FROM (SELECT key AS gone_key, attempt AS gone_attempt, node_id AS gone_node
                      FROM agent_fleet_tasks r
                      WHERE r.state = 'running' AND NOT EXISTS (
                          SELECT 1 FROM agent_fleet_nodes n
                          WHERE n.node_id = r.node_id AND n.generation = r.node_generation
                            AND n.state IN ('up', 'draining') AND n.lease_until >= now())
                      FOR UPDATE SKIP LOCKED) gone
                WHERE t.key = gone.gone_key
                RETURNING t.key, t.state, gone.gone_attempt, gone.gone_node""",
            {"why": "its node stopped renewing its lease"}).fetchall()
        for key, state, attempt, node_id in rows:
            _end_attempt(conn, key, attempt, "abandoned", None,
                         f"node {node_id} stopped renewing its lease")
            _announce(conn, key, state)
        return [(key, state) for key, state, _, _ in rows]


def running_on(conn: psycopg.Connection, node_id: str) -> list[tuple[str, int, int, float]]:
    """(key, attempt, generation, seconds since it started) of each task the database has
    running on this node, any generation: what a node resumes at start and reconciles."""
    with conn.transaction():
        return conn.execute(
            """SELECT key, attempt, node_generation,
                      extract(epoch FROM now() - started_at)::float8
               FROM agent_fleet_tasks WHERE state = 'running' AND node_id = %s""",
            (node_id,)).fetchall()


def cancel_requested(conn: psycopg.Connection, node_id: str, generation: int) -> list[str]:
    """Keys of tasks running on this node that someone asked to cancel (the poll that
    backs up the NOTIFY)."""
    with conn.transaction():
        return [key for (key,) in conn.execute(
            """SELECT key FROM agent_fleet_tasks WHERE state = 'running' AND node_id = %s
               AND node_generation = %s AND cancel_requested_at IS NOT NULL""",
            (node_id, generation))]


def cancel(conn: psycopg.Connection, key: str) -> FleetTask | None:
    """Ask for a task to end: a queued one is cancelled at once; a running one's node is
    told (NOTIFY, backed by its heartbeat poll) and reports it cancelled. An ended task
    is left as it is. None if no task has the key."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(
            f"""UPDATE agent_fleet_tasks SET
                    cancel_requested_at = coalesce(cancel_requested_at, now()),
                    state = CASE WHEN state = 'queued' THEN 'cancelled' ELSE state END,
                    ending = CASE WHEN state = 'queued' THEN 'cancelled' ELSE ending END,
                    exit_code = CASE WHEN state = 'queued' THEN -1 ELSE exit_code END,
                    error = CASE WHEN state = 'queued' THEN 'cancelled before it started'
                                 ELSE error END,
                    ended_at = CASE WHEN state = 'queued' THEN now() ELSE ended_at END
                WHERE key = %s AND state IN ('queued', 'running') RETURNING {TASK_COLUMNS}""",
            (key,))
        row = cur.fetchone()
        if row is not None:
            cur.execute("SELECT pg_notify(%s, %s)",
                        (CANCEL if row["state"] == "running" else ENDED, key))
            return FleetTask.from_row(row)
    return get(conn, key)


def get(conn: psycopg.Connection, key: str) -> FleetTask | None:
    """The task with its attempts, or None."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT {TASK_COLUMNS} FROM agent_fleet_tasks WHERE key = %s", (key,))
        row = cur.fetchone()
        if row is None:
            return None
        cur.execute("""SELECT attempt, node_id, started_at, ended_at, ending, exit_code, why
                       FROM agent_fleet_attempts WHERE key = %s ORDER BY attempt""", (key,))
        return FleetTask.from_row(row, [Attempt(**a) for a in cur.fetchall()])


def ended(conn: psycopg.Connection, keys: Iterable[str]) -> list[FleetTask]:
    """Those of the keys whose tasks have ended (a submitter collecting its results)."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute(f"""SELECT {TASK_COLUMNS} FROM agent_fleet_tasks
                        WHERE key = ANY(%s) AND state IN ('finished', 'cancelled', 'lost')""",
                    (list(keys),))
        return [FleetTask.from_row(row) for row in cur.fetchall()]


def ended_keys(conn: psycopg.Connection, keys: Iterable[str]) -> list[str]:
    """Those of the keys whose tasks have ended, without their results: a submitter's
    cheap look for results its notifications missed."""
    with conn.transaction():
        return [key for (key,) in conn.execute(
            """SELECT key FROM agent_fleet_tasks
               WHERE key = ANY(%s) AND state IN ('finished', 'cancelled', 'lost')""",
            (list(keys),))]


def list_tasks(conn: psycopg.Connection, *, state: str | None = None, node: str | None = None,
               before: int | None = None, limit: int = 100, tails: bool = True
               ) -> list[FleetTask]:
    """Newest first (by submission), filtered; `before` is the cursor: a seq from the
    previous page. tails=False leaves stdout_tail and stderr_tail None: a page of a
    listing does not carry up to 128 KiB a task that nobody shows."""
    where, args = ["true"], []
    if state is not None:
        where.append("state = %s")
        args.append(state)
    if node is not None:
        where.append("node_id = %s")
        args.append(node)
    if before is not None:
        where.append("seq < %s")
        args.append(before)
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        columns = TASK_COLUMNS if tails else _WITHOUT_TAILS
        cur.execute(f"""SELECT {columns} FROM agent_fleet_tasks WHERE {' AND '.join(where)}
                        ORDER BY seq DESC LIMIT %s""", (*args, limit))
        return [FleetTask.from_row(row) for row in cur.fetchall()]


_WITHOUT_TAILS = TASK_COLUMNS.replace("stdout_tail", "NULL::bytea AS stdout_tail").replace(
    "stderr_tail", "NULL::bytea AS stderr_tail")


def prune(conn: psycopg.Connection, keep_days: float, batch: int = 1000) -> int:
    """Delete up to `batch` tasks that ended more than keep_days ago (their attempts go
    with them); the caller repeats while a full batch went."""
    with conn.transaction():
        return conn.execute(
            """DELETE FROM agent_fleet_tasks WHERE key IN (
                   SELECT key FROM agent_fleet_tasks
                   WHERE ended_at < now() - make_interval(secs => %s) LIMIT %s)""",
            (keep_days * 86400.0, batch)).rowcount


def queued_count(conn: psycopg.Connection) -> int:
    with conn.transaction():
        return conn.execute("SELECT count(*) FROM agent_fleet_tasks WHERE state = 'queued'"
                            ).fetchone()[0]

