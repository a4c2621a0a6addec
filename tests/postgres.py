"""A private PostgreSQL run from the machine's own binaries, for the tests and the fleet demo.

The fleet door needs a real PostgreSQL, and its promises (a restart or a crash of the
database loses nothing) can only be proved against one that a test may stop and kill.
So each user of this module gets a server of its own under a directory it names:

    base_dir/data         the cluster (initdb runs once; a later start keeps the data)
    base_dir/socket       the Unix socket, for the superuser only (never /var/run)
    base_dir/server.log   what initdb and the server said
    base_dir/agent.password  the login role's password, so a later start can reuse it

The server listens on 127.0.0.1 on a port chosen free at the first start and kept across
restarts. The role `agent` logs in over TCP with a random password (scram-sha-256), as a
fleet agent would; the superuser `postgres` is trusted on the socket only, whose directory
no other user may enter (mode 0700), and is used for admin work.

PostgreSQL refuses to run as root. Run as root, the server runs as the Debian `postgres`
user (or `nobody`) and base_dir is handed to it; otherwise it runs as the current user.

The postmaster is our own child (no pg_ctl, which would daemonize it): we know its pid,
reap it after a kill, and find its backends by their working directory (the data dir),
which is how `crash()` waits for them and how nothing is left behind.

Plain Python, no pytest: `make fleet` uses it from a script as well.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

DEBIAN_ROOT = Path("/usr/lib/postgresql")
ROLE = "agent"
DATABASE = "agent"
SUPERUSER = "postgres"
HOST = "127.0.0.1"
DEFAULT_SETTINGS = {
    "listen_addresses": HOST,
    "max_connections": "400",  # 50 fleet nodes in one test, about 3 connections each
    "fsync": "off",  # no OS crash in tests; a killed server still recovers from its WAL
    "synchronous_commit": "on",  # a commit acknowledged is in the WAL: a crash keeps it
    "password_encryption": "scram-sha-256",
    "unix_socket_permissions": "0700",
}
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
INITDB_TIMEOUT = 120.0
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with its terminating NUL
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
PR_GET_CHILD_SUBREAPER = 37
FIRST_START_ATTEMPTS = 3  # a port chosen free may be taken before the server binds it


class PostgresError(RuntimeError):
    """The server could not be set up, started or stopped."""


@dataclass(frozen=True)
class Binaries:
    initdb: Path
    postgres: Path


@dataclass(frozen=True)
class RunAs:
    """The unprivileged user the server runs as when we are root."""
    name: str
    uid: int
    gid: int


def find_binaries(search_path: str | None = None,
                  debian_root: Path = DEBIAN_ROOT) -> Binaries | None:
    """initdb and postgres from PATH, else from the newest /usr/lib/postgresql/*/bin,
    where Debian installs them without putting them on PATH."""
    initdb = shutil.which("initdb", path=search_path)
    postgres = shutil.which("postgres", path=search_path)
    if initdb and postgres:
        return Binaries(Path(initdb), Path(postgres))
    for version in sorted(_versions(debian_root), key=_version_key, reverse=True):
        bin_dir = debian_root / version / "bin"
        if all(os.access(bin_dir / name, os.X_OK) for name in ("initdb", "postgres")):
            return Binaries(bin_dir / "initdb", bin_dir / "postgres")
    return None


def _versions(debian_root: Path) -> list[str]:
    try:
        return [p.name for p in debian_root.iterdir() if _version_key(p.name) != ()]
    except OSError:
        return []


def _version_key(name: str) -> tuple[int, ...]:
    """'9.6' < '15' as numbers, not as strings; () for what is no version."""
    try:
        return tuple(int(part) for part in name.split("."))
    except ValueError:
        return ()


def choose_run_as() -> RunAs | None:
    """None when not root (run as ourselves); else `postgres`, or failing that `nobody`."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return RunAs(name, entry.pw_uid, entry.pw_gid)
    raise PostgresError("running as root, and there is no 'postgres' or 'nobody' user "
                        "to run PostgreSQL as (it refuses to run as root)")


def free_port(host: str = HOST) -> int:
    """A port nobody listens on now: the kernel's choice for a bind to port 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class PostgresServer:
    """One private PostgreSQL under base_dir; see the module docstring."""

    def __init__(self, base_dir: Path, *, port: int | None = None,
                 settings: dict[str, str] | None = None,
                 binaries: Binaries | None = None, run_as: RunAs | None = None):
        """port: None chooses a free one at the first start, kept from then on.
        settings: postgresql.conf names and values over DEFAULT_SETTINGS.
        binaries, run_as: default find_binaries() and choose_run_as()."""
        self.base_dir = Path(base_dir).absolute()
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "socket"
        self.log_path = self.base_dir / "server.log"
        self._password_path = self.base_dir / "agent.password"
        self._port = port
        self._settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self._binaries = binaries or find_binaries()
        self._run_as = run_as if run_as is not None else choose_run_as()
        self._proc: subprocess.Popen | None = None
        self._password = self._read_password() or secrets.token_urlsafe(24)

    @staticmethod
    def available() -> bool:
        """Whether this machine has the binaries to run a server."""
        return find_binaries() is not None

    # -- what clients need ---------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise PostgresError("the server has no port before its first start")
        return self._port

    @property
    def password(self) -> str:
        return self._password

    @property
    def dsn(self) -> str:
        """libpq key=value for the role agent over TCP, password included."""
        return self.dsn_for(DATABASE)

    @property
    def dsn_without_password(self) -> str:
        return make_conninfo(host=HOST, port=self.port, user=ROLE, dbname=DATABASE)

    @property
    def url(self) -> str:
        return (f"postgresql://{ROLE}:{quote(self.password, safe='')}"
                f"@{HOST}:{self.port}/{DATABASE}")

    def dsn_for(self, dbname: str) -> str:
        return make_conninfo(host=HOST, port=self.port, user=ROLE,
                             password=self.password, dbname=dbname)

    def admin_connect(self, dbname: str = "postgres") -> psycopg.Connection:
        """An autocommit connection as the superuser, over the private socket."""
        return psycopg.connect(host=str(self.socket_dir), port=self.port, user=SUPERUSER,
                               dbname=dbname, autocommit=True, connect_timeout=10)

    def create_database(self, name: str) -> str:
        """A new empty database owned by agent; its dsn."""
        _check_name(name)
        with self.admin_connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(ROLE)))
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        """Drop it even while clients are connected: FORCE terminates them first."""
        _check_name(name)
        with self.admin_connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))

    # -- life cycle ----------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """initdb on the first call for this base_dir, then start and wait until ready."""
        if self.running:
            raise PostgresError(f"the server under {self.base_dir} is already running")
        if self._binaries is None:
            raise PostgresError("PostgreSQL's binaries (initdb, postgres) are neither on "
                                f"PATH nor under {DEBIAN_ROOT}/*/bin")
        self._prepare()
        if self._port is None:
            self._first_start()
        else:
            self._start_on(self._port)
        try:
            self._ensure_role()
        except psycopg.Error as e:
            self._kill_all()
            raise PostgresError(f"could not set up the role {ROLE}: {e}; server killed"
                                + self._log_tail()) from e

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Fast shutdown (SIGINT): clients are disconnected, committed work is kept."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_all()
                raise PostgresError(f"the server did not stop within {timeout} s; killed"
                                    + self._log_tail()) from None
        self._forget()
        self._wait_processes_gone(timeout, "after its postmaster stopped")

    def restart(self) -> None:
        """Stop (fast) and start again: same port, same data."""
        self.stop()
        self.start()

    def crash(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGKILL the postmaster, as a crash would, and wait until its backends
        have noticed and gone (a start before then would find them holding the
        shared memory); a later start() recovers from the WAL."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise PostgresError("crash() needs a running server")
        _kill_and_reap(proc, time.monotonic() + timeout)
        self._forget()
        self._wait_processes_gone(timeout, "after its postmaster was killed")

    def processes(self) -> list[int]:
        """Every live process of this cluster: a postgres whose working directory is our
        data dir (each backend chdirs there; no other cluster's does)."""
        assert self._binaries is not None
        exe = str(self._binaries.postgres.resolve())
        data = str(self.data_dir.resolve())
        found = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                if (os.readlink(f"/proc/{pid}/cwd") == data
                        and os.readlink(f"/proc/{pid}/exe") == exe):
                    found.append(int(pid))
            except OSError:  # gone, a zombie, or not ours to read
                continue
        return found

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- setting up --------------------------------------------------------------

    def _prepare(self) -> None:
        self._check_socket_path()
        self.base_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._check_reachable()
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self.log_path.touch(mode=0o600, exist_ok=True)
        self._write_password()
        for path in (self.base_dir, self.socket_dir, self.log_path, self._password_path):
            self._give(path)
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()

    def _check_reachable(self) -> None:
        """The server's user must be able to walk down to base_dir: say so plainly,
        rather than leave it to initdb's 'Permission denied'."""
        if self._run_as is None:
            return
        groups = set(os.getgrouplist(self._run_as.name, self._run_as.gid))
        for parent in reversed(self.base_dir.parents):
            if not _searchable(parent, self._run_as.uid, groups):
                mode = stat.S_IMODE(parent.stat().st_mode)
                raise PostgresError(
                    f"PostgreSQL runs as user {self._run_as.name!r} (it refuses root), which "
                    f"cannot enter {parent} (mode {mode:04o}); choose a base_dir it can "
                    f"reach, such as one under /tmp")

    def _check_socket_path(self) -> None:
        longest = self.socket_dir / ".s.PGSQL.65535.lock"
        if len(os.fsencode(longest)) > SOCKET_PATH_MAX:
            raise PostgresError(f"base_dir is too deep for a Unix socket ({longest} is "
                                f"longer than {SOCKET_PATH_MAX} bytes); choose a shorter one")

    def _give(self, path: Path) -> None:
        if self._run_as is not None:
            os.chown(path, self._run_as.uid, self._run_as.gid)

    def _read_password(self) -> str | None:
        try:
            return self._password_path.read_text().strip() or None
        except FileNotFoundError:
            return None

    def _write_password(self) -> None:
        if self._read_password() == self._password:
            return
        fd = os.open(self._password_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._password + "\n")

    def _initdb(self) -> None:
        assert self._binaries is not None
        args = [str(self._binaries.initdb), "-D", str(self.data_dir), "-U", SUPERUSER,
                "--auth-local=trust", "--auth-host=scram-sha-256",
                "--no-locale", "--encoding=UTF8"]
        if self._settings.get("fsync") == "off":
            args.append("--no-sync")
        with open(self.log_path, "ab") as log:
            try:
                result = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, timeout=INITDB_TIMEOUT,
                                        **self._child_options())
            except subprocess.TimeoutExpired:
                raise PostgresError(f"initdb did not finish within {INITDB_TIMEOUT} s"
                                    + self._log_tail()) from None
        if result.returncode != 0:
            raise PostgresError(f"initdb exited with {result.returncode}" + self._log_tail())

    def _ensure_role(self) -> None:
        """The login role and its database, with this object's password (every start,
        so a base_dir whose password file was lost still gets a known password)."""
        with self.admin_connect() as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                                  (ROLE,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(ROLE), sql.Literal(self._password)))
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                (DATABASE,)).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(DATABASE), sql.Identifier(ROLE)))

    # -- starting ----------------------------------------------------------------

    def _first_start(self) -> None:
        """Choose a free port; if someone takes it before the server binds, another."""
        for attempt in range(1, FIRST_START_ATTEMPTS + 1):
            port = free_port()
            log_size = self.log_path.stat().st_size
            try:
                self._start_on(port)
            except PostgresError:
                said = self.log_path.read_bytes()[log_size:]
                if b"could not bind" in said and attempt < FIRST_START_ATTEMPTS:
                    continue
                raise
            self._port = port
            return

    def _start_on(self, port: int) -> None:
        assert self._binaries is not None
        settings = {**self._settings, "port": str(port),
                    "unix_socket_directories": _quoted_list_item(self.socket_dir)}
        args = [str(self._binaries.postgres), "-D", str(self.data_dir)]
        for name, value in settings.items():
            args += ["-c", f"{name}={value}"]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          **self._child_options())
        _RUNNING.add(self)
        self._wait_ready(START_TIMEOUT)

    def _wait_ready(self, timeout: float) -> None:
        """Until postmaster.pid names our postmaster and says 'ready' (as pg_ctl -w)."""
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while not self._says_ready(self._proc.pid):
            code = self._proc.poll()
            if code is not None:
                self._forget()
                raise PostgresError(f"the server exited with {code} while starting"
                                    + self._log_tail())
            if time.monotonic() > deadline:
                self._kill_all()
                raise PostgresError(f"the server was not ready within {timeout} s; killed"
                                    + self._log_tail())
            time.sleep(0.02)

    def _says_ready(self, pid: int) -> bool:
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, UnicodeDecodeError):
            return False
        return len(lines) >= 8 and lines[0].strip() == str(pid) and lines[7].strip() == "ready"

    def _child_options(self) -> dict:
        """As the unprivileged user when we are root, in base_dir, free of the PG*
        variables of whoever runs us (they would steer initdb, not us)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        options: dict = {"cwd": self.base_dir, "env": env}
        if self._run_as is not None:
            options.update(user=self._run_as.uid, group=self._run_as.gid, extra_groups=[])
            env["HOME"] = str(self.base_dir)
        return options

    # -- stopping ----------------------------------------------------------------

    def _forget(self) -> None:
        self._proc = None
        _RUNNING.discard(self)

    def _wait_processes_gone(self, timeout: float, when: str) -> None:
        deadline = time.monotonic() + timeout
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.02)
        if left:
            self._kill_pids(left)
            raise PostgresError(f"server processes {left} still ran {timeout} s {when}; "
                                f"killed" + self._log_tail())

    def _kill_all(self) -> None:
        """The last resort: SIGKILL the postmaster and every process of the cluster."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _kill_and_reap(proc, time.monotonic() + 5)
        self._forget()
        self._kill_pids(self.processes())

    @staticmethod
    def _kill_pids(pids: list[int]) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"\n(no server log: {e})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"\n--- last lines of {self.log_path} ---\n{tail}"


def _kill_and_reap(postmaster: subprocess.Popen, deadline: float) -> None:
    """SIGKILL the postmaster and reap the backends it orphans. Orphans go to the
    nearest subreaper, else PID 1, which in a container may never reap them: they
    would stay as zombies. So for this moment we are a subreaper, and wait for exactly
    the postmaster's children (counted while it is stopped, so it forks no more),
    never for any other child of ours."""
    with _adopting_orphans():
        os.kill(postmaster.pid, signal.SIGSTOP)
        children = _children_of(postmaster.pid)
        postmaster.kill()
        postmaster.wait(max(0.0, deadline - time.monotonic()))
        while children and time.monotonic() < deadline:
            children = [pid for pid in children if not _reaped(pid)]
            time.sleep(0.01)


def _children_of(ppid: int) -> list[int]:
    """Every process whose parent is ppid, zombies included (from /proc/PID/stat)."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                raw = f.read()
        except (OSError, ValueError):
            continue
        if int(raw[raw.rindex(b")") + 2:].split()[1]) == ppid:
            found.append(int(pid))
    return found


def _reaped(pid: int) -> bool:
    """Whether pid is gone for us: reaped now, or not (or no longer) our child."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True


@contextlib.contextmanager
def _adopting_orphans():
    """PR_SET_CHILD_SUBREAPER on this process for the block, as it was after."""
    libc = ctypes.CDLL(None, use_errno=True)
    was = ctypes.c_int(0)
    libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, was.value, 0, 0, 0)


def _searchable(directory: Path, uid: int, groups: set[int]) -> bool:
    st = directory.stat()
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _quoted_list_item(path: Path) -> str:
    """unix_socket_directories is a comma-separated list: quote the one path."""
    text = str(path)
    if '"' in text:
        raise PostgresError(f"base_dir may not contain a double quote: {path}")
    return f'"{text}"'


def _check_name(name: str) -> None:
    if not name or len(name.encode()) > 63:
        raise ValueError(f"a database name has 1 to 63 bytes: {name!r}")


_RUNNING: set[PostgresServer] = set()


@atexit.register
def _stop_every_server() -> None:
    """The backstop: a caller that forgot stop() (or died of an exception before it)
    still leaves no postgres process behind."""
    for server in list(_RUNNING):
        try:
            server.stop(timeout=10)
        except PostgresError:
            server._kill_all()
