"""A PostgreSQL connection on a thread of its own, so no query blocks the reactor: calls
run there one at a time, in order. A lost connection is reopened on the next call; the log
says when the database went away and when it came back."""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

import psycopg
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool


log = Logger()
T = TypeVar("T")


class Unavailable(Exception):
    """The database could not be reached or the connection broke; try again later."""


class Database:
    """One connection, one thread: what a fleet node or submitter uses for one job
    (claims and reports, heartbeats, reads), so a slow query of one never delays another."""

    def __init__(self, reactor, dsn: str, name: str, connect: Callable = psycopg.connect):
        self._reactor = reactor
        self._dsn = dsn
        self.name = name
        self._connect = connect
        self._conn: psycopg.Connection | None = None
        self._pool = ThreadPool(1, 1, name=f"fleet-{name}")
        self._started = False
        self.down_since: float | None = None
        """When calls began to fail (reactor time), None while they work."""
        self.last_error: str | None = None

    def run(self, f: Callable[..., T], *args, **kwargs) -> Deferred[T]:
        """f(connection, *args, **kwargs) on the connection's thread. Fails with
        Unavailable when the connection is lost (f's own errors pass unchanged)."""
        if not self._started:
            self._pool.start()
            self._started = True
        d = deferToThreadPool(self._reactor, self._pool, self._call, f, args, kwargs)
        return d.addBoth(self._track)

    def _call(self, f, args, kwargs):
        if self._conn is None or self._conn.closed:
            try:
                self._conn = self._connect(self._dsn, autocommit=True)
            except psycopg.Error as e:
                raise Unavailable(_first_line(e)) from None
        try:
            return f(self._conn, *args, **kwargs)
        except psycopg.OperationalError as e:
            if self._conn.closed or self._conn.broken:
                self._drop()
                raise Unavailable(_first_line(e)) from None
            raise
        except psycopg.InterfaceError as e:  # the connection was closed under us
            self._drop()
            raise Unavailable(_first_line(e)) from None

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    def _track(self, result):
        """On the reactor thread: log the change when the database goes away or comes back."""
        failed = getattr(result, "check", None) is not None and result.check(Unavailable)
        now = self._reactor.seconds()
        if failed and self.down_since is None:
            self.down_since = now
            self.last_error = result.value.args[0] if result.value.args else "unreachable"
            log.warn("fleet database ({name}) unreachable: {error}; retrying with back-off",
                     name=self.name, error=self.last_error)
        elif not failed and self.down_since is not None:
            log.info("fleet database ({name}) reachable again after {seconds:.1f} s",
                     name=self.name, seconds=now - self.down_since)
            self.down_since = None
            self.last_error = None
        return result

    def close(self) -> Deferred[None]:
        """Close the connection on its thread, then stop the thread (off the reactor)."""
        if not self._started:
            return succeed(None)
        d = deferToThreadPool(self._reactor, self._pool, self._drop)

        def stop(_):
            self._started = False
            return deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                     self._pool.stop)
        return d.addBoth(stop)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class Listener:
    """LISTEN on a dedicated connection (LISTEN needs a session: not a transaction-pooling
    PgBouncer). Each notification reaches `received(channel, payload)` on the reactor
    thread; after the connection comes back, `reconnected()` runs, since notifications
    sent meanwhile are lost and whoever listens should look again."""

    def __init__(self, reactor, dsn: str, channels: tuple[str, ...],
                 received: Callable[[str, str], None], reconnected: Callable[[], None],
                 connect: Callable = psycopg.connect):
        self._reactor = reactor
        self._dsn = dsn
        self._channels = channels
        self._received = received
        self._reconnected = reconnected
        self._connect = connect
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._listen_forever, name="fleet-listen",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> Deferred[None]:
        """Stop listening; fires once the thread has closed its connection."""
        self._stop.set()
        thread = self._thread
        if thread is None:
            return succeed(None)
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), thread.join, 5.0)

    def _listen_forever(self) -> None:
        delay, first = 0.2, True
        while not self._stop.is_set():
            try:
                with self._connect(self._dsn, autocommit=True) as conn:
                    for channel in self._channels:
                        conn.execute(f"LISTEN {channel}")
                    if not first:
                        self._reactor.callFromThread(self._reconnected)
                    first, delay = False, 0.2
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self._reactor.callFromThread(self._received, note.channel,
                                                         note.payload)
            except psycopg.Error:
                first = False
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)

