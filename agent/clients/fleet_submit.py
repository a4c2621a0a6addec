"""agent-scheduler --fleet: put a batch on the fleet's queue in PostgreSQL, then print each
task's result as it ends.

Submitting is idempotent per key: a batch is inserted a few hundred tasks per transaction,
and a key the fleet knows with the same command attaches to that task (another submitter's,
or this batch's own after a lost connection), so any number of submitters may send the same
batch and each task still runs once. Waiting is a LISTEN on the ENDED channel, whose keys are
fetched in batches; a look every POLL seconds (and at once after the listener reconnects)
finds the results a notification never brought. While the database is away (a restart, a
cut network) every call is tried again with back-off, and stderr says when it went and when
it came back.

On Twisted with agent.fleet.database rather than psycopg on a thread of our own: the
node's Database and Listener already reconnect and hand results to the reactor; the
scheduler's summary, progress line and Clock-driven tests come with it.
"""
from __future__ import annotations

import itertools
import os
import socket
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import psycopg
import psycopg.errors
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from agent.clients.batch import InputError, Summary, numbered_requests, read_input
from agent.clients.fleet_results import conflict_fields, encode, result_fields
from agent.clients.progress import Progress
from agent.core.request import InvalidRequest
from agent.fleet import dsn as dsns
from agent.fleet import nodes, schema, tasks
from agent.fleet.database import Database, Listener, Unavailable
from agent.fleet.records import FleetTask, Submission
from agent.fleet.submissions import submission_from

SUBMIT_BATCH = 500
"""Tasks per INSERT (and transaction): a round trip per batch, not per task."""
FETCH_BATCH = 200
"""Ended tasks read at once: each row holds up to 128 KiB of output tails."""
FETCH_DELAY = 0.05
"""Seconds a notification waits for others to fetch with: at most 20 queries a second."""
CHECK_BATCH = 1000
"""Keys per look for results the notifications missed (keys only, no output)."""
POLL = 2.0
"""Seconds between those looks; counted from the end of the previous one."""
FIRST_RETRY, MAX_RETRY = 0.25, 5.0
"""Back-off between calls while the database is unreachable."""
NETWORK_BUDGET = 20.0
"""Seconds a connection to a silent server may take to fail (connect, keepalives):
about half of it each, so a cut network is noticed instead of waited on for minutes."""


class FleetInputError(InputError):
    """A request the fleet would refuse; nothing of the batch was submitted."""


class _Finished(Exception):
    """Raised into a call begun before the last result came (ignored: see _fail)."""


class Interrupted(Exception):
    """The command was stopped (Ctrl-C, SIGTERM) before it was done."""


class FleetUnreachable(Exception):
    """The first call to the database failed: nothing was submitted."""


@dataclass(frozen=True)
class Entry:
    """One task of the batch and where it was in the input ("line 3")."""

    where: str
    submission: Submission


def entries_from(numbered: Sequence[tuple[str, dict]], timeout_scale: float = 1.0
                 ) -> list[Entry]:
    """Each request checked as the fleet will before any is submitted, so a bad line
    fails the batch whole instead of half of it running."""
    entries = []
    for where, request in numbered:
        try:
            entries.append(Entry(where, submission_from(request, timeout_scale)))
        except InvalidRequest as bad:
            raise FleetInputError(f"{where}: {bad.message}") from None
    return entries


def chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def submitter_name() -> str:
    """Who submitted, as the fleet's records and the nodes' logs show it."""
    return f"agent-scheduler@{socket.gethostname()}:{os.getpid()}"


def prepare_schema(conn: psycopg.Connection) -> None:
    """Create the fleet's tables when no agent has yet (tasks may be queued before the
    first agent starts); a role without that right relies on the agents having done it."""
    try:
        schema.migrate(conn)
    except psycopg.errors.InsufficientPrivilege:
        pass


class Submitter:
    """One batch: submit it, then (in `run`) wait for every result and print it.

    db: an agent.fleet.database.Database (run(f, *args) -> Deferred, Unavailable when the
    connection is lost). listen(received, reconnected): a started-later Listener on the
    ENDED channel. out takes bytes (result lines, keys), err text (complaints)."""

    def __init__(self, reactor, db, listen: Callable, *, submitted_by: str, where: str = "",
                 out=None, err=None, progress: Progress | None = None, poll: float = POLL):
        self._reactor = reactor
        self._db = db
        self._listen = listen
        self._by = submitted_by
        self._where = where
        self._out = out if out is not None else sys.stdout.buffer
        self._err = err if err is not None else sys.stderr
        self._progress = progress
        self._poll_every = poll
        self._started = reactor.seconds()
        self.summary = Summary()
        self._down_since: float | None = None
        self._waiting: dict[str, list[Entry]] = {}
        """Keys submitted and not yet ended, each with the entries waiting for it."""
        self._due: dict[str, None] = {}
        """Keys known to have ended, not yet fetched, in the order we heard of them."""
        self._fetching = False
        self._looking = False
        self._look_again = False
        self._poll_call = None
        self._submitted = False
        self._done: Deferred | None = None
        self._over = False
        """The run ended (every result came, or it failed): no call may start any more."""
        self._listener = None
        self._results = 0
        self.created = 0
        self.refused = 0

    def summary_line(self) -> str:
        return self.summary.line(self._reactor.seconds() - self._started)

    def submitted_line(self) -> str:
        """--no-wait's summary: what was queued, attached and refused."""
        return (f"agent-scheduler: {self.summary.sent} sent to the fleet: {self.created} "
                f"queued, {self.summary.attached} attached to tasks it knew, {self.refused} "
                f"refused, "
                f"{self._reactor.seconds() - self._started:.2f} s")

    # -- submitting

    async def submit(self, entries: Sequence[Entry],
                     answered: Callable[[Entry, str], None]) -> None:
        """Queue every entry, SUBMIT_BATCH at a time; answered(entry, 'created' |
        'attached' | 'conflict') for each as soon as its batch is committed."""
        try:
            await self._db.run(prepare_schema)
        except Unavailable as e:
            raise FleetUnreachable(f"cannot reach the fleet database {self._where}: "
                                   f"{e.args[0] if e.args else 'unreachable'}") from None
        for chunk in chunks(entries, SUBMIT_BATCH):
            answers = await self._call(tasks.submit_many, [e.submission for e in chunk], self._by)
            self.summary.sent += len(chunk)
            for entry, answer in zip(chunk, answers):
                self.created += answer == "created"
                self.summary.attached += answer == "attached"
                self.refused += answer == "conflict"
                answered(entry, answer)
        if entries:
            self._say_who_can_run(entries, await self._call(nodes.list_nodes, False))

    def _say_who_can_run(self, entries: Sequence[Entry], up) -> None:
        """Tasks wait in the queue for a node that can take them: say so when none is up,
        or when no node up has the labels some of them ask for."""
        if not up:
            self._complain("no fleet node is up: the tasks wait in the queue until an agent "
                           "started with --fleet joins")
            return
        unmatched = {entry.submission.labels for entry in entries
                     if not any(set(entry.submission.labels) <= set(node.labels.items())
                                for node in up)}
        for labels in sorted(unmatched):
            wanted = ",".join(f"{name}={value}" for name, value in labels)
            self._complain(f"no fleet node up has the labels {wanted}: the tasks that ask for "
                           "them wait in the queue until such a node joins")

    async def submit_only(self, entries: Sequence[Entry]) -> None:
        """--no-wait: submit, and print each queued task's key as its batch commits."""
        def answered(entry: Entry, answer: str) -> None:
            if answer == "conflict":
                self._complain(f"{entry.where}: {_conflict(entry)}")
            else:
                self._out.write(entry.submission.key.encode("utf-8") + b"\n")
        try:
            await self.submit(entries, answered)
        finally:
            self._out.flush()
            self.summary.missing = (len(entries) - self.created - self.summary.attached
                                    - self.refused)

    # -- waiting

    async def run(self, entries: Sequence[Entry]) -> None:
        """Submit, then print each result as its task ends, until every task has one."""
        self._done = Deferred()
        self._listener = self._listen(self._notified, self._reconnected)
        self._listener.start()  # before submitting: no task may end unheard
        try:
            try:
                await self.submit(entries, self._wait_for)
            except _Finished:
                pass  # reading results failed meanwhile: self._done says why
            else:
                self._submitted = True
                self._check_done()
                self._look_now()  # attached tasks may have ended long ago
            await self._done
        finally:
            self._over = True
            self.summary.missing = len(entries) - self._results
            if self._poll_call is not None and self._poll_call.active():
                self._poll_call.cancel()
            await self._listener.stop()

    def _wait_for(self, entry: Entry, answer: str) -> None:
        submission = entry.submission
        if answer == "conflict":
            self._emit(conflict_fields(submission.key, submission.command,
                                       _conflict(entry)))
        else:
            self._waiting.setdefault(submission.key, []).append(entry)

    def _notified(self, channel: str, key: str) -> None:
        if key in self._waiting:
            self._due[key] = None
            self._fetch_soon()

    def _reconnected(self) -> None:
        self._complain("listening again; looking for results that ended meanwhile")
        self._look_now()

    def _fetch_soon(self) -> None:
        """Fetch in FETCH_DELAY unless a whole batch is due: the notifications that come
        meanwhile join the same query (a busy fleet ends hundreds of tasks a second)."""
        if self._fetching or not self._due or self._over:
            return
        self._fetching = True
        delay = 0 if len(self._due) >= FETCH_BATCH else FETCH_DELAY
        self._reactor.callLater(delay, self._start_fetch)

    def _start_fetch(self) -> None:
        Deferred.fromCoroutine(self._fetch()).addErrback(self._fail)

    async def _fetch(self) -> None:
        """Read up to FETCH_BATCH ended tasks and print them, oldest end first."""
        try:
            if self._over:
                return
            keys = list(itertools.islice(self._due, FETCH_BATCH))
            for key in keys:
                del self._due[key]
            ended = await self._call(tasks.ended, keys)
            for task in sorted(ended, key=lambda t: (t.ended_at, t.seq)):
                if not self._over:  # not after an interruption
                    self._result(task)
        finally:
            self._fetching = False
        self._check_done()
        self._fetch_soon()

    def _look_now(self) -> None:
        """Look at once for every waiting task that ended (the poll, and after a gap)."""
        if self._over or not self._submitted:
            return
        if self._looking:
            self._look_again = True
            return
        if self._poll_call is not None and self._poll_call.active():
            self._poll_call.cancel()
        self._looking = True
        Deferred.fromCoroutine(self._look()).addErrback(self._fail)

    async def _look(self) -> None:
        try:
            self._look_again = True
            while self._look_again and not self._over:
                self._look_again = False
                for keys in chunks(list(self._waiting), CHECK_BATCH):
                    for key in await self._call(tasks.ended_keys, keys):
                        if key in self._waiting:
                            self._due[key] = None
                    self._fetch_soon()
        finally:
            self._looking = False
        if not self._over:
            self._poll_call = self._reactor.callLater(self._poll_every, self._look_now)

    def _result(self, task: FleetTask) -> None:
        for _ in self._waiting.pop(task.key, ()):
            self._emit(result_fields(task))

    def _emit(self, fields: dict) -> None:
        self._results += 1
        self.summary.count(fields)
        self._out.write(encode(fields))
        self._out.flush()
        if self._progress is not None:
            self._progress.update(self.summary)

    def _check_done(self) -> None:
        if self._submitted and not self._waiting and not self._over:
            self._over = True
            self._done.callback(None)

    def interrupt(self) -> None:
        """Stop where it is (the reactor is shutting down): the tasks already queued stay
        in the fleet, the ones not yet sent are not sent."""
        if self._done is not None:
            self._fail(Interrupted())
        self._over = True

    def _fail(self, failure) -> None:
        """A call the database refused for good (not a lost connection): the run ends."""
        if not self._over:
            self._over = True
            self._done.errback(failure)

    # -- the database, through outages

    async def _call(self, f, *args):
        """f(conn, *args) on the database, tried again with back-off while it is away."""
        delay = FIRST_RETRY
        while True:
            if self._over:
                raise _Finished()  # a look or a retry still under way: its answer is moot
            try:
                result = await self._db.run(f, *args)
            except Unavailable as e:
                self._went_away(e.args[0] if e.args else "unreachable")
                await deferLater(self._reactor, delay, lambda: None)
                delay = min(delay * 2, MAX_RETRY)
                continue
            self._came_back()
            return result

    def _went_away(self, why: str) -> None:
        if self._down_since is None:
            self._down_since = self._reactor.seconds()
            self._complain(f"the fleet database is unreachable ({why}); trying again with "
                           f"back-off, nothing is lost")

    def _came_back(self) -> None:
        if self._down_since is not None:
            away = self._reactor.seconds() - self._down_since
            self._down_since = None
            self._complain(f"the fleet database is back after {away:.1f} s; carrying on")

    def _complain(self, message: str) -> None:
        if self._progress is not None:
            self._progress.clear()
        self._err.write(f"agent-scheduler: {message}\n")
        self._err.flush()


def _conflict(entry: Entry) -> str:
    """The store's own words for a key taken by another command."""
    return str(tasks.FleetKeyConflict(entry.submission.key))


# -- the command line's --fleet mode


def connection_dsn(dsn: str) -> str:
    """The DSN with the time limits a node uses (values the user gave win), named
    agent-scheduler in pg_stat_activity."""
    if "application_name" not in dsns.parse(dsn):
        dsn = psycopg.conninfo.make_conninfo(dsn, application_name="agent-scheduler")
    return dsns.for_node(dsn, NETWORK_BUDGET)


async def run_batch(reactor, dsn: str, file: str | None, *, wait: bool = True,
                    timeout_scale: float = 1.0, out=None, err=None) -> None:
    """agent-scheduler --fleet: read, check, submit, (wait and print); SystemExit 1 when
    a task has no result (with --no-wait: was refused), 2 for bad input."""
    err = err if err is not None else sys.stderr
    try:
        entries = entries_from(numbered_requests(read_input(file)), timeout_scale)
    except InputError as e:
        err.write(f"agent-scheduler: {e}\n")
        raise SystemExit(2)
    dsn = connection_dsn(dsn)
    db = Database(reactor, dsn, "submit")
    progress = Progress(err, len(entries), reactor) if wait else None
    submitter = Submitter(
        reactor, db, lambda received, reconnected: Listener(
            reactor, dsn, (tasks.ENDED,), received, reconnected),
        submitted_by=submitter_name(), where=dsns.for_log(dsn), out=out, err=err,
        progress=progress)
    finished = Deferred()

    def stopping() -> Deferred:
        """SIGINT or SIGTERM: end the run, and hold the reactor until the connection is
        closed (its thread would keep the process alive)."""
        submitter.interrupt()
        return finished
    trigger = reactor.addSystemEventTrigger("before", "shutdown", stopping)
    broken = False
    try:
        if wait:
            await submitter.run(entries)
        else:
            await submitter.submit_only(entries)
    except FleetUnreachable as e:
        broken = True
        err.write(f"agent-scheduler: {e}\n")
    except (Interrupted, _Finished):
        broken = True
        if progress is not None:
            progress.clear()
        err.write("agent-scheduler: interrupted; what was queued stays in the fleet (submit "
                  "the same ids again to wait for their results)\n")
    except (psycopg.Error, schema.SchemaTooNew) as e:
        broken = True
        err.write(f"agent-scheduler: the fleet database refused: {_first_line(e)}\n")
    finally:
        await db.close()
        reactor.removeSystemEventTrigger(trigger)
        finished.callback(None)
    if progress is not None:
        progress.clear()
    err.write((submitter.summary_line() if wait else submitter.submitted_line()) + "\n")
    err.flush()
    if broken or submitter.summary.missing or (not wait and submitter.refused):
        raise SystemExit(1)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
