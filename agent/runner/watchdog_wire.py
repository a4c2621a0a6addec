"""The lines the agent and its watchdog process exchange over their pipes.

One short ASCII line per message, so a write is one atomic pipe write
(under PIPE_BUF) and the watchdog needs nothing but the standard library
to read it. The agent says (on the watchdog's stdin):

    watch PGID [fenced]   guard this task group (fenced: it dies when the lease runs out)
    forget PGID           the group's cleanup is verified: stop guarding it
    lease SECONDS         fenced groups die if no new lease comes within SECONDS
    no-lease              fenced groups no longer depend on a lease
    bye                   a clean stop: exit and kill nothing

and the watchdog answers (on its stdout):

    fenced PGID...        the lease ran out: these fenced groups were SIGKILLed
    error TEXT            a line it could not read (a bug in the agent)

Imported by the watchdog program, so it imports nothing but the standard library.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MAX_LINE = 4096
"""Longest line either side accepts: PIPE_BUF, so every message is written whole."""


class BadMessage(ValueError):
    """A line that is not one of the messages above."""


@dataclass(frozen=True)
class Watch:
    pgid: int
    fenced: bool = False


@dataclass(frozen=True)
class Forget:
    pgid: int


@dataclass(frozen=True)
class Lease:
    seconds: float


@dataclass(frozen=True)
class NoLease:
    pass


@dataclass(frozen=True)
class Bye:
    pass


@dataclass(frozen=True)
class Fenced:
    pgids: tuple[int, ...]


@dataclass(frozen=True)
class Trouble:
    text: str


Message = Watch | Forget | Lease | NoLease | Bye
Report = Fenced | Trouble


def encode(message: Message | Report) -> bytes:
    """The message's line, newline included."""
    match message:
        case Watch(pgid, fenced):
            text = f"watch {pgid} fenced" if fenced else f"watch {pgid}"
        case Forget(pgid):
            text = f"forget {pgid}"
        case Lease(seconds):
            text = f"lease {seconds!r}"
        case NoLease():
            text = "no-lease"
        case Bye():
            text = "bye"
        case Fenced(pgids):
            text = " ".join(["fenced", *map(str, pgids)])
        case Trouble(text):
            text = "error " + text.replace("\n", " ")[:MAX_LINE - 16]
        case _:
            raise TypeError(f"not a watchdog message: {message!r}")
    return text.encode("ascii", "backslashreplace") + b"\n"


def parse(line: bytes) -> Message:
    """One line from the agent (without its newline); BadMessage if it is none."""
    words = _words(line)
    match words:
        case ["watch", pgid]:
            return Watch(_pgid(pgid))
        case ["watch", pgid, "fenced"]:
            return Watch(_pgid(pgid), fenced=True)
        case ["forget", pgid]:
            return Forget(_pgid(pgid))
        case ["lease", seconds]:
            return Lease(_seconds(seconds))
        case ["no-lease"]:
            return NoLease()
        case ["bye"]:
            return Bye()
    raise BadMessage(f"not a watchdog message: {_shown(line)}")


def parse_report(line: bytes) -> Report:
    """One line from the watchdog (without its newline); BadMessage if it is none."""
    words = _words(line)
    match words:
        case ["fenced", *pgids] if pgids:
            return Fenced(tuple(_pgid(pgid) for pgid in pgids))
        case ["error", *_]:
            return Trouble(line.decode("ascii", "backslashreplace").partition(" ")[2])
    raise BadMessage(f"not a watchdog report: {_shown(line)}")


def checked_pgid(pgid: int) -> int:
    """A process group a task may lead: killpg(0) or killpg(1) would hit the wrong ones."""
    if isinstance(pgid, bool) or not isinstance(pgid, int) or pgid < 2:
        raise BadMessage(f"not a task's process group: {pgid!r}")
    return pgid


def checked_seconds(seconds: float) -> float:
    """A lease's length: a finite number of seconds, zero (already out) or more."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
            or not math.isfinite(seconds) or seconds < 0:
        raise BadMessage(f"not a lease length in seconds: {seconds!r}")
    return float(seconds)


def _words(line: bytes) -> list[str]:
    if len(line) > MAX_LINE:
        raise BadMessage(f"line of {len(line)} bytes, over {MAX_LINE}")
    try:
        return line.decode("ascii").split()
    except UnicodeDecodeError:
        raise BadMessage(f"not ASCII: {_shown(line)}") from None


def _pgid(word: str) -> int:
    if not word.isdigit():
        raise BadMessage(f"not a process group: {word!r}")
    return checked_pgid(int(word))


def _seconds(word: str) -> float:
    try:
        seconds = float(word)
    except ValueError:
        raise BadMessage(f"not a number of seconds: {word!r}") from None
    return checked_seconds(seconds)


def _shown(line: bytes) -> str:
    return repr(line[:80])
