"""A data dir only the agent can touch: created private, refused when others could change it.

The history holds every command line the agent ran, secrets in arguments
included, and the output of every task: it is created 0700/0600 whatever the
umask, and the agent will not start on a directory that another user owns or
that group or others may write to (anyone who could plant a file or a symlink
there could make the agent read or delete what they chose). Tasks keep the
umask the agent was started with: what they create is theirs to decide.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from twisted.logger import Logger

log = Logger()

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


class UnsafeDataDir(Exception):
    """The data dir (or something in it) could be changed by someone other than the agent."""


def prepare(data_dir: Path) -> None:
    """Create data_dir (0700) if need be, and refuse it if it is not the agent's alone."""
    data_dir.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    _refuse_if_others_can_change(data_dir)


def private_subdir(path: Path) -> None:
    """A directory in the data dir, created 0700, or made 0700 if an older agent left it open."""
    try:
        os.mkdir(path, PRIVATE_DIR)
    except FileExistsError:
        _tighten(path, PRIVATE_DIR)


def private_file(path: Path) -> None:
    """A file in the data dir, created empty 0600 if missing (before SQLite opens it, so
    its journal files get the same mode), or made 0600 if an older agent left it open."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         PRIVATE_FILE))
    except FileExistsError:
        _tighten(path, PRIVATE_FILE)


def _refuse_if_others_can_change(data_dir: Path) -> None:
    info = os.stat(data_dir)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDataDir(f"the data dir {data_dir} is not a directory")
    if info.st_uid != os.geteuid():
        raise UnsafeDataDir(
            f"the data dir {data_dir} belongs to uid {info.st_uid}, not to the agent's user "
            f"(uid {os.geteuid()}): another user could read every command line and change the "
            f"history. Use a directory of the agent's own (chown {os.geteuid()} {data_dir}, "
            "chmod 700 it) or another --data-dir")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeDataDir(
            f"the data dir {data_dir} can be written by its group or by others "
            f"(mode {stat.S_IMODE(info.st_mode):o}): they could plant files or symlinks the "
            f"agent would read or delete. Fix it with: chmod 700 {data_dir}")


def _tighten(path: Path, mode: int) -> None:
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise UnsafeDataDir(f"{path} is a symlink; the agent follows none in its data dir. "
                            "Remove it and start again")
    if info.st_uid != os.geteuid():
        raise UnsafeDataDir(f"{path} belongs to uid {info.st_uid}, not to the agent's user")
    if stat.S_IMODE(info.st_mode) & ~mode:
        os.chmod(path, stat.S_IMODE(info.st_mode) & mode)
        log.info("made {path} private (mode {mode:o}); it was {was:o}", path=str(path),
                 mode=stat.S_IMODE(info.st_mode) & mode, was=stat.S_IMODE(info.st_mode))
