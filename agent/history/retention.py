"""History retention: --keep-days and --keep-bytes prune the oldest ended tasks and their output.

The policy runs at start and every PRUNE_INTERVAL seconds (a LoopingCall on
the reactor it is given, so a test drives it with a Clock). It never touches
a queued or running task: the store hands out only ended ones, and filters
out any it still holds in memory before anything is deleted.

Everything here runs on the reactor and only decides. What blocks (SQL,
stat, unlink) is agent.history.prune, run by the store on its thread a
batch of BATCH tasks per job, so reads and writes queued meanwhile wait for
one batch, never for a whole prune of a large history.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

if TYPE_CHECKING:  # types only: the store drives prune itself, and this drives the store
    from agent.history.prune import Usage
    from agent.history.store import Store

log = Logger()

PRUNE_INTERVAL = 3600.0
"""Seconds between prunes after the one at start."""

SIZE_CHECK_DELAY = 1.0
"""After a task ends, the data dir's size is measured this much later (once for all the
tasks that ended meanwhile), and pruned at once if it is over --keep-bytes: 30 tasks
could fill a data dir to 12 times the limit between two hourly prunes."""

BATCH = 500
"""Tasks examined (and at most deleted) per store-thread job."""

SIZE_ROUNDS = 3
"""Passes a size prune makes when the file sizes it measures after a pass
are still over the limit (its estimate of what a row takes was low)."""

DAY = 86400.0
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from '4294967296', '512M', '4G', '1.5GiB' (K, M, G, T are powers of 1024)."""
    match = _SIZE.match(str(text))
    if match is None:
        raise ValueError(f"not a size in bytes: {text!r} (try 4294967296, 512M or 4G)")
    return int(float(match[1]) * _UNITS[match[2].lower()])


parse_size.coerceDoc = "Bytes, or with a K, M, G or T suffix (powers of 1024: 4G = 4294967296)."


@dataclass(frozen=True)
class Policy:
    keep_days: float = 30.0
    """Ended tasks older than this (by finished_at) go; 0 = no age limit."""
    keep_bytes: int = 4 << 30
    """The data dir (database files and output) is kept under this; 0 = no size limit."""

    @property
    def active(self) -> bool:
        return self.keep_days > 0 or self.keep_bytes > 0


@dataclass
class Pruned:
    """One prune's account, logged when it removed anything."""

    by_age: int = 0
    by_size: int = 0
    freed_bytes: int = 0
    usage: Usage | None = None
    size_unmet: bool = False
    """Still over --keep-bytes with nothing left that may be pruned."""

    @property
    def tasks(self) -> int:
        return self.by_age + self.by_size

    @property
    def reason(self) -> str:
        return " and ".join(why for why, n in (("age", self.by_age), ("size", self.by_size)) if n)


class _Stopped(Exception):
    """The agent is stopping: the store closes after the job in hand, so ask it nothing more."""


class Retention(Service):
    """Prunes the store by a Policy at start and every PRUNE_INTERVAL seconds.

    A child of the agent's service: it stops (and waits for the batch in
    hand) before the store closes. A failing prune is logged and the next
    one still comes.
    """

    name = "retention"

    def __init__(self, store: Store, policy: Policy, clock):
        self._store = store
        self.policy = policy
        self._clock = clock
        self._loop: LoopingCall | None = None
        self._current: Deferred | None = None
        self._stopping = False
        self._unmet_logged = False
        self._size_check = None

    def observe(self, task) -> None:
        """Engine observer: a task that ended may have pushed the data dir over --keep-bytes."""
        if (task.state != "finished" or self.policy.keep_bytes <= 0 or not self.running
                or self._size_check is not None):
            return
        self._size_check = self._clock.callLater(SIZE_CHECK_DELAY, self._check_size)

    def _check_size(self) -> None:
        self._size_check = None
        if self._current is not None or self._stopping:
            return  # a prune is under way; the next end asks again
        self._current = self._ask(self._store.usage)
        self._current.addCallback(self._prune_if_over)
        self._current.addErrback(lambda f: f.trap(_Stopped) and None)
        self._current.addErrback(lambda f: log.failure("measuring the data dir failed", f))
        self._current.addBoth(self._done)

    def _prune_if_over(self, usage: Usage):
        if usage.total <= self.policy.keep_bytes:
            return None
        self._current = None  # the prune below takes over as the one under way
        return self._prune_logging_errors()

    def startService(self):
        super().startService()
        if not self.policy.active:
            return
        self._stopping = False
        self._loop = LoopingCall(self._prune_logging_errors)
        self._loop.clock = self._clock
        self._loop.start(PRUNE_INTERVAL, now=True)

    def stopService(self):
        super().stopService()
        self._stopping = True
        if self._size_check is not None and self._size_check.active():
            self._size_check.cancel()
        self._size_check = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return self.idle()

    def idle(self) -> Deferred:
        """Fires once no prune is under way (at once if none is)."""
        if self._current is None:
            return succeed(None)
        done: Deferred = Deferred()
        self._current.addBoth(lambda result: (done.callback(None), result)[1])
        return done

    def _prune_logging_errors(self) -> Deferred:
        """What the LoopingCall runs: a failure would stop the loop, so none gets out."""
        self._current = self.prune()
        self._current.addCallback(self._report)
        self._current.addErrback(lambda f: f.trap(_Stopped) and None)
        self._current.addErrback(lambda f: log.failure("pruning the history failed", f))
        self._current.addBoth(self._done)
        return self._current

    def _done(self, result):
        self._current = None
        return result

    def _ask(self, method, *args, **kwargs) -> Deferred:
        """A store call, unless the agent is stopping: a job queued after the store's close
        would never be answered, and shutdown waits for this prune."""
        if self._stopping:
            raise _Stopped()
        return method(*args, **kwargs)

    @inlineCallbacks
    def prune(self):
        """Prune once by age, then by size; a Pruned with what it did."""
        pruned = Pruned()
        yield self._ask(self._store.compact)  # an emptied log: the database's size is its rows'
        start = yield self._ask(self._store.usage)
        if self.policy.keep_days > 0:
            cutoff = self._clock.seconds() - self.policy.keep_days * DAY
            pruned.by_age, freed = yield self._prune_expired(cutoff)
            pruned.freed_bytes += freed
        if self.policy.keep_bytes > 0:
            usage = start if not pruned.by_age else (yield self._ask(self._store.usage))
            pruned.by_size, freed, pruned.size_unmet = yield self._prune_to_size(usage)
            pruned.freed_bytes += freed
        if pruned.tasks:
            database_after = yield self._ask(self._store.compact)
            pruned.freed_bytes += max(0, start.database_bytes - database_after)
        pruned.usage = yield self._ask(self._store.usage)
        return pruned

    @inlineCallbacks
    def _prune_expired(self, cutoff: float):
        removed = freed = 0
        after = 0
        while after is not None and not self._stopping:
            batch = yield self._ask(self._store.ended_tasks, after, BATCH, finished_before=cutoff)
            after = batch.last_seq
            if batch.candidates:
                gone = yield self._ask(self._store.remove, [c.id for c in batch.candidates])
                removed, freed = removed + len(gone.ids), freed + gone.output_bytes
        return removed, freed

    @inlineCallbacks
    def _prune_to_size(self, usage: Usage):
        """Oldest first until the estimate is under the limit, then measure again: a few
        passes at most, since a row's share of the database file is only an average.
        The third value is True when the limit cannot be met: nothing is left to prune."""
        limit = self.policy.keep_bytes
        removed = freed = 0
        exhausted = False
        for _ in range(SIZE_ROUNDS):
            if usage.total <= limit or exhausted or self._stopping:
                break
            row_bytes = usage.database_bytes / max(usage.rows, 1)
            excess, after, removed_before = usage.total - limit, 0, removed
            while excess > 0 and not self._stopping:
                if after is None:
                    exhausted = True
                    break
                batch = yield self._ask(self._store.ended_tasks, after, BATCH)
                after = batch.last_seq
                chosen = []
                for candidate in batch.candidates:
                    if excess <= 0:
                        break
                    chosen.append(candidate.id)
                    excess -= candidate.kept_bytes + row_bytes
                if chosen:
                    gone = yield self._ask(self._store.remove, chosen)
                    removed, freed = removed + len(gone.ids), freed + gone.output_bytes
            if removed > removed_before:
                yield self._ask(self._store.compact)
                usage = yield self._ask(self._store.usage)
        return removed, freed, exhausted and usage.total > limit

    def _report(self, pruned: Pruned) -> Pruned:
        if pruned.tasks:
            log.info("pruned {tasks} task(s) and their output by {reason} ({by_age} older than "
                     "--keep-days, {by_size} over --keep-bytes), freeing {freed_bytes} bytes; "
                     "the data dir now holds {total_bytes} bytes",
                     tasks=pruned.tasks, reason=pruned.reason, by_age=pruned.by_age,
                     by_size=pruned.by_size, freed_bytes=pruned.freed_bytes,
                     total_bytes=pruned.usage.total)
        if pruned.size_unmet and not self._unmet_logged:
            log.warn("the data dir holds {total_bytes} bytes, over --keep-bytes {limit}, and "
                     "nothing more may be pruned: what is left is the database itself and "
                     "tasks that are queued, running or just ended",
                     total_bytes=pruned.usage.total, limit=self.policy.keep_bytes)
        self._unmet_logged = pruned.size_unmet
        return pruned

