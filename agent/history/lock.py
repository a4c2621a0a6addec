"""One agent per data directory: an flock held for as long as the store is open.

Recovery marks every task recorded as running lost: a second agent on the
same directory would do that to the first one's live tasks.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path


class DataDirInUse(Exception):
    """Another agent holds this data directory: its running tasks are not ours to mark lost."""


def take(path: Path) -> int:
    """Lock the file at path (creating it); the descriptor that holds the lock until closed."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirInUse(f"{path.parent} is in use by another agent") from None
    return fd
