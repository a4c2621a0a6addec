"""posix_spawnp through ctypes, which lets go of the interpreter lock while the kernel works.

os.posix_spawnp holds the GIL for the whole call, and the call lasts until
the child has exec'd (glibc's posix_spawn is a vfork): 0.15-0.3 ms in which
no other Python runs, under load 45% of the agent's time. Called through
ctypes, the same C function runs with the GIL released, so a spawn thread
(agent.runner.spawner) can wait for the kernel while the reactor goes on.

prepare() builds the C arguments on the calling thread (the reactor); run()
is the call itself and may run on any thread. Linux with glibc or musl only
(their posix_spawn flag values); `available` is False elsewhere, and the
runner uses os.posix_spawnp inline instead.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Mapping, Sequence

POSIX_SPAWN_SETPGROUP = 0x02
POSIX_SPAWN_SETSIGDEF = 0x04
POSIX_SPAWN_SETSIGMASK = 0x08
"""glibc's and musl's values (spawn.h)."""

_ATTR_BYTES = 1024
_FILE_ACTIONS_BYTES = 256
_SIGSET_BYTES = 128
"""Room for posix_spawnattr_t (336 bytes in glibc), posix_spawn_file_actions_t (80) and
sigset_t (128): the C library initialises them, this only has to give it enough."""


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for name in ("posix_spawnp", "posix_spawn_file_actions_init",
                     "posix_spawn_file_actions_adddup2", "posix_spawn_file_actions_destroy",
                     "posix_spawnattr_init", "posix_spawnattr_setflags",
                     "posix_spawnattr_setpgroup", "posix_spawnattr_setsigdefault",
                     "posix_spawnattr_setsigmask", "sigemptyset", "sigaddset"):
            getattr(libc, name)
    except (OSError, AttributeError):
        return None
    return libc


_c = _libc()
available = _c is not None


class _Attributes:
    """A posix_spawnattr_t: a new process group, the given signals reset to their
    default action, and no signal blocked (the spawn thread blocks them all)."""

    def __init__(self, reset_signals: Sequence[int]):
        self.buffer = ctypes.create_string_buffer(_ATTR_BYTES)
        default, mask = (ctypes.create_string_buffer(_SIGSET_BYTES) for _ in range(2))
        _c.sigemptyset(default)
        for number in reset_signals:
            _c.sigaddset(default, number)
        _c.sigemptyset(mask)
        _check(_c.posix_spawnattr_init(self.buffer))
        _check(_c.posix_spawnattr_setpgroup(self.buffer, 0))
        _check(_c.posix_spawnattr_setsigdefault(self.buffer, default))
        _check(_c.posix_spawnattr_setsigmask(self.buffer, mask))
        _check(_c.posix_spawnattr_setflags(
            self.buffer, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK))


_attributes: dict[tuple[int, ...], _Attributes] = {}
"""One attribute object per set of signals to reset (in practice, one)."""

_environment: tuple[dict, ctypes.Array] | None = None
"""The last environment given and its envp array: the agent's own, over and over."""


class Prepared:
    """A spawn's C arguments, ready to be passed to run() on any thread."""

    __slots__ = ("file", "argv", "envp", "file_actions", "attributes", "highest_fd")

    def __init__(self, file: bytes, argv, envp, file_actions, attributes: _Attributes,
                 highest_fd: int):
        self.file, self.argv, self.envp = file, argv, envp
        self.file_actions, self.attributes = file_actions, attributes
        self.highest_fd = highest_fd
        """The highest of the agent's descriptors the child is given (agent.fdlimit)."""


def prepare(executable: str, argv: Sequence[str], environment: Mapping,
            fd_map: Mapping[int, int], reset_signals: Sequence[int]) -> Prepared:
    """ValueError for what exec cannot take (a NUL in a string, '=' in a variable's name)."""
    key = tuple(reset_signals)
    attributes = _attributes.get(key)
    if attributes is None:
        attributes = _attributes[key] = _Attributes(key)
    actions = ctypes.create_string_buffer(_FILE_ACTIONS_BYTES)
    _check(_c.posix_spawn_file_actions_init(actions))
    try:
        for child_fd, parent_fd in fd_map.items():
            _check(_c.posix_spawn_file_actions_adddup2(actions, parent_fd, child_fd))
        return Prepared(_c_string(executable), _c_array([_c_string(a) for a in argv]),
                        _envp(environment), actions, attributes,
                        max(fd_map.values(), default=2))
    except BaseException:
        _c.posix_spawn_file_actions_destroy(actions)
        raise


def run(prepared: Prepared) -> int:
    """posix_spawnp; the child's pid, or OSError (errno of the failed exec). Releases the GIL."""
    pid = ctypes.c_int()
    try:
        error = _c.posix_spawnp(ctypes.byref(pid), prepared.file, prepared.file_actions,
                                prepared.attributes.buffer, prepared.argv, prepared.envp)
    finally:
        _c.posix_spawn_file_actions_destroy(prepared.file_actions)
    if error:
        raise OSError(error, os.strerror(error), os.fsdecode(prepared.file))
    return pid.value


def discard(prepared: Prepared) -> None:
    """A prepared spawn that will not run: free what the C library allocated for it."""
    _c.posix_spawn_file_actions_destroy(prepared.file_actions)


def _envp(environment: Mapping) -> ctypes.Array:
    global _environment
    if _environment is not None and _environment[0] == environment:
        return _environment[1]
    entries = []
    for name, value in environment.items():
        name, value = os.fsencode(name), os.fsencode(value)
        if not name or b"=" in name:
            raise ValueError("illegal environment variable name")
        entries.append(_c_string(name + b"=" + value))
    envp = _c_array(entries)
    _environment = (dict(environment), envp)
    return envp


def _c_string(value) -> bytes:
    value = os.fsencode(value)
    if b"\0" in value:
        raise ValueError("embedded null byte")
    return value


_array_types: dict[int, type] = {}
"""char *[] types by size: each ctypes array type is a class, with reference cycles of its
own, so a few sizes made once (powers of two) serve every argv and environment."""


def _c_array(items: list[bytes]) -> ctypes.Array:
    """A NULL-terminated char *[] of items (the rest of the array is NULL too)."""
    size = 8
    while size <= len(items):
        size *= 2
    array_type = _array_types.get(size)
    if array_type is None:
        array_type = _array_types[size] = ctypes.c_char_p * size
    return array_type(*items)


def _check(error: int) -> None:
    if error:
        raise OSError(error, os.strerror(error))
