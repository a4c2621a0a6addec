"""The fleet's connection string: libpq's key=value form or a postgresql:// URL, a password
from the DSN, PGPASSFILE (libpq reads it) or a file of its own, and the settings that let a
node notice a dead network before its lease runs out. Never logged with its password."""
from __future__ import annotations

import re
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo


class BadDsn(ValueError):
    """Not a connection string libpq can read; the message says why (without the password)."""


def parse(dsn: str) -> dict:
    try:
        return conninfo_to_dict(dsn)
    except Exception as e:  # psycopg.ProgrammingError, with libpq's words
        words = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadDsn(f"--fleet is not a PostgreSQL connection string: "
                     f"{_QUOTED.sub(_hidden, words)}") from None


_QUOTED = re.compile(r'"([^"]*)"')


def _hidden(quoted: re.Match) -> str:
    """libpq quotes the piece of the string it stumbled on, which may be part of the
    password (`missing "=" after "ret"` for password=sec ret): only "=" is shown."""
    return quoted[0] if quoted[1] == "=" else '"..."'


def with_password_file(dsn: str, password_file: str | None) -> str:
    """The DSN with the password read from password_file (its first line), if one is given."""
    if not password_file:
        return dsn
    lines = Path(password_file).read_text().splitlines()
    if not lines or not lines[0]:
        raise BadDsn(f"--fleet-password-file {password_file} is empty")
    return make_conninfo(dsn, password=lines[0])


def for_log(dsn: str) -> str:
    """The DSN as it may be shown: host, port, database and user; never the password."""
    try:
        params = conninfo_to_dict(dsn)
    except Exception:
        return "(unreadable connection string)"
    shown = {k: v for k, v in params.items() if k in ("host", "hostaddr", "port", "dbname", "user",
                                                      "sslmode")}
    return make_conninfo("", **shown) or "(libpq defaults)"


def for_node(dsn: str, lease_seconds: float) -> str:
    """Time limits so that a query on a cut network fails within the lease instead of
    waiting for TCP's retransmissions (about 15 minutes): connect and user timeouts,
    keepalives. Values the DSN already sets win."""
    given = parse(dsn)
    budget = max(1, int(lease_seconds / 2))
    wanted = {"connect_timeout": str(budget), "tcp_user_timeout": str(budget * 1000),
              "keepalives": "1", "keepalives_idle": str(budget), "keepalives_interval": "1",
              "keepalives_count": "3", "application_name": "agent-fleet"}
    extra = {k: v for k, v in wanted.items() if k not in given}
    return make_conninfo(dsn, **extra)
