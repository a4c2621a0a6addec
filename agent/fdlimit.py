"""The agent's open-file limit: raised to the hard limit at start, given back to children.

Each running task holds two pipe descriptors in the agent, so at the soft
limit most services start with (1024 under systemd) the agent could not run
about 500 tasks at once: the next spawn would fail with EMFILE, and so would
accepting a connection. The hard limit is what the administrator allows, so
the agent takes it, as Go programs and nginx do. Children get the original
soft limit back: a program that uses select() must never see a descriptor
over 1023, and a task should not inherit what only the agent needed.
"""
from __future__ import annotations

import errno
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

from twisted.logger import Logger

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None

log = Logger()

T = TypeVar("T")

NR_OPEN_PATH = "/proc/sys/fs/nr_open"
NR_OPEN_FALLBACK = 1 << 20
"""Linux refuses a limit above fs.nr_open, even when the hard limit is unlimited."""

SPARE_DESCRIPTORS = 32
"""Descriptors left free under the original limit while it is held for a spawn,
for whatever the store's thread opens in those microseconds."""

_original: tuple[int, int] | None = None
_raised: tuple[int, int] | None = None
_held = threading.Lock()
"""One spawn at a time may hold the limit down (the reactor's, or the spawn thread's)."""


def children_limit() -> tuple[int, int] | None:
    """(soft, hard) to give a child, or None when the agent never raised its own."""
    return _original


def raise_open_file_limit(nr_open_path: str = NR_OPEN_PATH) -> tuple[int, int] | None:
    """Raise the soft limit to the hard one (capped at fs.nr_open); (old, new) if raised."""
    global _original, _raised
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(_finite(hard), _nr_open(nr_open_path))
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warn("could not raise the open-file limit from {soft} to {target}: {error}",
                     soft=soft, target=target, error=e)
            return None
        _original, _raised = (soft, hard), (target, hard)
        log.info("open-file limit raised from {soft} to {target} (tasks still get {soft})",
                 soft=soft, target=target)
        return soft, target
    return None


@contextmanager
def original_limit_held(highest_fd: int) -> Iterator[bool]:
    """Hold the agent's soft limit at the original around a posix_spawn, so the
    child inherits it before exec; yields whether the child will have it.

    posix_spawn cannot set a limit in the child, and setting it from outside
    afterwards races the program, which may read its limit or fork first (it
    did, on a busy two-core machine). Holding the agent's own limit down for
    the spawn is exact, but safe only while every descriptor the spawn maps
    fits under the original with room to spare: otherwise this yields False
    and the caller sets the child's limit from outside, at once.
    """
    if _original is None:
        yield True
        return
    if highest_fd + SPARE_DESCRIPTORS >= _original[0]:
        yield False
        return
    with _held:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, _original)
        except (ValueError, OSError):
            yield False
            return
        try:
            yield True
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, _raised)


def spawned_with_original_limit(highest_fd: int, spawn: Callable[[], int]) -> int:
    """spawn() -> pid, the child given the open-file limit the agent started with: held
    at the original around the spawn when that is safe, else set from outside at once
    (give_back); nothing at all when the agent never raised its own."""
    if _original is None:
        return spawn()
    with original_limit_held(highest_fd) as inherited:
        pid = spawn()
    if not inherited:
        give_back(pid)
    return pid


def made_despite_a_hold(make: Callable[[], T]) -> T:
    """make() a descriptor on the reactor's thread; if the limit was full, once more
    after any hold the spawn thread has on it.

    While the spawn thread holds the limit at the original (original_limit_held),
    a descriptor the reactor makes gets EMFILE if every number under the original
    is taken, though the agent has room to spare once the hold ends, a few hundred
    microseconds later. It checks only the spawn's own descriptors, since counting
    the process's would cost a directory listing a spawn.
    """
    try:
        return make()
    except OSError as e:
        if e.errno != errno.EMFILE or _original is None:
            raise
    with _held:  # waits for the hold, if there is one, to end
        return make()


def give_back(pid: int) -> None:
    """Set a child's open-file limit from outside, at once, when the agent holds
    too many descriptors to lower its own around the spawn: the program has only
    just started, but it may have read its limit (or forked) already."""
    if _original is not None:
        try:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, _original)
        except OSError:
            pass  # already gone: nothing left to limit


def forget_raise() -> None:
    """Children keep the agent's own limit again (for tests)."""
    global _original, _raised
    _original = _raised = None


def _finite(limit: int) -> int:
    return NR_OPEN_FALLBACK if limit == resource.RLIM_INFINITY else limit


def _nr_open(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return NR_OPEN_FALLBACK
