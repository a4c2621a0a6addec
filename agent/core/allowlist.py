"""An optional allow-list of programs, applied by admission to every door.

    [[allow]]
    program = "/usr/bin/rsync"            # an absolute path
    args = ["-a", "/srv/*", "backup:*"]   # optional: one fnmatch pattern per argument;
                                          # a last "..." admits any further arguments

A request's argv[0] is resolved as the spawn would resolve it (with a slash:
relative to the task's working directory; without: on the task's PATH), then
to its real path, and compared with each entry's real path. The task is then
started from that resolved path, so what was checked is what runs, whatever
PATH or the working directory say afterwards.
"""
from __future__ import annotations

import fnmatch
import os
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from agent.core.decisions import Refused

ANY_MORE = "..."


class NotAllowed(Refused):
    """The command is not on the allow-list; nothing starts."""

    reason = "not_allowed"

    def __init__(self, why: str):
        super().__init__(f"command not allowed: {why}")


class BadAllowList(ValueError):
    """The allow-list file cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Entry:
    program: str
    """The real path of an allowed program."""
    args: tuple[str, ...] | None = None
    """One pattern per argument (ANY_MORE last for any further ones); None: any arguments."""

    def admits(self, args: Sequence[str]) -> bool:
        if self.args is None:
            return True
        patterns = self.args
        if patterns and patterns[-1] == ANY_MORE:
            patterns = patterns[:-1]
            if len(args) < len(patterns):
                return False
            args = args[:len(patterns)]
        elif len(args) != len(patterns):
            return False
        return all(fnmatch.fnmatchcase(arg, pattern) for arg, pattern in zip(args, patterns))


class AllowList:
    def __init__(self, entries: Sequence[Entry]):
        self._entries = tuple(entries)

    @classmethod
    def load(cls, path: Path) -> AllowList:
        try:
            document = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise BadAllowList(f"{path}: {e}") from None
        entries = document.get("allow")
        if set(document) - {"allow"} or not isinstance(entries, list) or not entries:
            raise BadAllowList(f"{path} must hold [[allow]] tables and nothing else")
        return cls([_entry(path, number, entry) for number, entry in enumerate(entries, 1)])

    def executable(self, argv: Sequence[str], cwd: str | None,
                   env: Mapping[str, str] | None) -> str:
        """The real path to start argv from; NotAllowed unless an entry admits it."""
        program = _resolve(argv[0], cwd, env if env is not None else os.environ)
        if program is None:
            raise NotAllowed(f"{argv[0]!r} is not a program the agent can find")
        entries = [entry for entry in self._entries if entry.program == program]
        if not entries:
            raise NotAllowed(f"{program} is not on the allow-list")
        if not any(entry.admits(argv[1:]) for entry in entries):
            raise NotAllowed(f"the arguments match no pattern the allow-list has for {program}")
        return program


def _entry(path: Path, number: int, entry) -> Entry:
    where = f"{path}: [[allow]] number {number}"
    if not isinstance(entry, dict) or set(entry) - {"program", "args"}:
        raise BadAllowList(f"{where} takes program and args only")
    program = entry.get("program")
    if not isinstance(program, str) or not os.path.isabs(program):
        raise BadAllowList(f"{where}: program must be an absolute path")
    if not os.access(program, os.X_OK):
        raise BadAllowList(f"{where}: {program} is not an executable file")
    args = entry.get("args")
    if args is not None and (not isinstance(args, list)
                             or not all(isinstance(a, str) for a in args)
                             or ANY_MORE in args[:-1]):
        raise BadAllowList(f'{where}: args must be a list of patterns, "{ANY_MORE}" only last')
    return Entry(os.path.realpath(program), None if args is None else tuple(args))


def _resolve(argv0: str, cwd: str | None, env: Mapping[str, str]) -> str | None:
    if "/" in argv0:
        path = os.path.join(cwd or os.getcwd(), argv0)
        found = path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    else:
        found = shutil.which(argv0, path=env.get("PATH", os.defpath))
        if found is not None and not os.path.isabs(found):  # a relative PATH entry
            found = os.path.join(cwd or os.getcwd(), found)
    return None if found is None else os.path.realpath(found)
