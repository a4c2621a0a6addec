"""The agent's options: `twistd agent --help` is their reference."""
from __future__ import annotations

import getopt
import os
import re
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path

from twisted.python import usage

from agent.core.engine import LOG_TASKS
from agent.doors.tcp.wire import TIMEOUT_UNITS
from agent.history.retention import parse_size


ENV_PREFIX = "AGENT_"
FLAG_WORDS = {"1": 1, "true": 1, "yes": 1, "0": 0, "false": 0, "no": 0}
"""What a flag's environment variable may say, in any case."""
NOT_FROM_ENVIRONMENT = {"token-file"}
"""AGENT_TOKEN_FILE is agentctl's: the client's token, maybe a named, narrower one. Read as
the agent's --token-file it would make that token an admin token (or create an admin token
next to a --tokens-file), so the agent takes --token-file from the file or command line only."""


def env_name(option: str) -> str:
    """AGENT_KEEP_TCP_OUTPUT for keep-tcp-output."""
    return ENV_PREFIX + option.upper().replace("-", "_")


class Options(usage.Options):
    """Every option may also come from a TOML file (--config) or an AGENT_<OPTION> variable:
    defaults < file < environment < command line (docs/operations.md)."""

    optParameters = [
        ["config", None, None,
         "TOML file of options (keys are the long option names: parallel = 4, "
         "keep-tcp-output = true); AGENT_<OPTION> variables override it and the command "
         "line overrides both. Also from AGENT_CONFIG."],
        ["listen", "l", "tcp:3000:interface=127.0.0.1",
         "Twisted server endpoint for the TCP task protocol (tcp:3000 = all interfaces; ssl:... "
         "works; mtls:PORT:privateKey=K:certKey=C:caCerts=CA requires client certificates)."],
        ["timeout-unit", None, "s", "Unit of a request's timeout: s or ms."],
        ["protected-mode", None, "yes",
         "yes: the TCP door, which has no client authentication, answers only clients on this "
         "host even when --listen binds wider; no: it answers whoever reaches it."],
        ["parallel", "p", 1, "Tasks running at once on the whole node, across connections; 0 = unlimited.",
         int],
        ["when-busy", None, "reject",
         "Over --parallel: reject (answer 'cannot allow concurrent executions' at once) or queue (FIFO)."],
        ["log-format", None, "text",
         "text: twistd's log lines; json: one JSON object per line on stdout (time, level, "
         "namespace, message, fields), for journald, Loki or Elasticsearch."],
        ["log-tasks", None, "all",
         "Which ended tasks get a log line: all, failures (anything but exit code 0) or none."],
        ["max-queue", None, 10000,
         "With --when-busy queue: most TCP tasks waiting for a slot; past it a request is "
         "answered 'cannot allow concurrent executions' at once. 0 = no bound.", int],
        ["max-queue-bytes", None, 64 << 20,
         "With --when-busy queue: most bytes of command lines waiting for a slot, added up; "
         "past it a request is answered 'cannot allow concurrent executions' at once. "
         "0 = no bound.", int],
        ["max-line", None, 1 << 20, "Longest request line in bytes; longer ones get an error result.", int],
        ["max-output-bytes", None, 256 << 20,
         "Most stdout bytes one TCP task may write; beyond it the task is killed "
         "('output limit exceeded') and its result holds the first bytes.", int],
        ["max-pending-output", None, 256 << 20,
         "Most bytes of finished TCP results kept in memory, across connections, for clients "
         "that have not read them; past it the results of the clients behind the longest go to "
         "anonymous files in the data dir. Bytes or 512M, 1G. 0 = no bound (all in memory).",
         parse_size],
        ["max-connections", None, 1024,
         "Most TCP connections open at once; past it a new one gets an error line and is "
         "closed. 0 = no cap.", int],
        ["line-timeout", None, 30.0,
         "Seconds a TCP client may leave a request line unfinished without sending more; then "
         "it gets an error line and the connection closes. 0 = no timeout.", float],
        ["http", None, None,
         "Twisted server endpoint for the HTTP API (e.g. tcp:8080:interface=127.0.0.1, or mtls:... "
         "as for --listen); off if not given."],
        ["token-file", None, None,
         "File holding the HTTP API's admin bearer token (every scope); default DATA_DIR/token, "
         "created with a random token (mode 0600) on first start unless --tokens-file is given."],
        ["allow-file", None, None,
         "TOML allow-list of programs ([[allow]] program = absolute path, optional args "
         "patterns) for every door; a command not on it is refused and nothing starts. "
         "Default: any program."],
        ["tokens-file", None, None,
         "TOML file of named tokens with scopes ([tokens.NAME] sha256 = hex SHA-256 of the "
         "token, scopes = [read, run, cancel, purge, admin]); see docs/security.md."],
        ["data-dir", None, "./agent-data", "Where the task history database and task output live."],
        ["max-running", None, 64,
         "HTTP tasks running at once (apart from --parallel); over it the API answers 429. "
         "0 = unlimited.", int],
        ["max-log-bytes", None, 256 << 20,
         "Output kept per task and stream; beyond it the newest bytes are kept.", int],
        ["kill-grace", None, 5.0,
         "Seconds between SIGTERM and SIGKILL when a task is cancelled over HTTP.", float],
        ["shutdown-grace", None, 5.0,
         "Seconds running tasks get between SIGTERM and SIGKILL when the agent stops; "
         "0 = SIGKILL at once.", float],
        ["keep-days", None, 30.0,
         "Days an ended task (record and output) is kept, counted from its end; older ones are "
         "pruned at start and hourly. 0 = no age limit.", float],
        ["keep-bytes", None, 4 << 30,
         "Most bytes the data dir (database and task output) may hold; past it the oldest ended "
         "tasks are pruned (at start, a second after tasks end, and hourly), and new HTTP tasks "
         "get 507 while running tasks' output alone fills it. 0 = no size limit.", parse_size],
        ["fleet", None, None,
         "Join a fleet: a PostgreSQL connection string (libpq key=value or postgresql:// URL) "
         "whose queue this agent works on beside its own doors; see docs/fleet.md. The "
         "password: in it, in PGPASSFILE, or in --fleet-password-file; never logged."],
        ["fleet-password-file", None, None,
         "File whose first line is the fleet database's password (keep it mode 0600)."],
        ["node-id", None, None,
         "This node's name in the fleet; default: the host name and a short digest of the "
         "data dir."],
        ["labels", None, "",
         "This node's labels, k=v,k=v: a fleet task that asks for labels runs only on nodes "
         "that have them all."],
        ["fleet-lease", None, 10.0,
         "Seconds a fleet node's heartbeat holds its lease: a node silent this long has its "
         "tasks queued again for others (after stopping them itself first).", float],
        ["fleet-url", None, None,
         "With --fleet: the URL others should use to reach this node's HTTP door (e.g. "
         "https://node7:8080); fleet records of tasks this node ran link to their whole "
         "output there."],
        ["fleet-poll", None, 2.0,
         "Seconds between looks at the fleet queue when no notification came (NOTIFY wakes a "
         "node at once; the poll only backs it up).", float],
    ]

    optFlags = [
        ["keep-tcp-output", None,
         "Keep the output of TCP tasks without an id in the history too, under --max-log-bytes "
         "(HTTP tasks' and TCP tasks with an id always keep theirs); without it their records "
         "count the bytes but keep none."],
    ]

    def __init__(self, environ: Mapping[str, str] | None = None):
        super().__init__()
        self.environ = os.environ if environ is None else environ
        """Where AGENT_<OPTION> variables are read: os.environ unless a test passes its own."""
        self.given: set[str] = set()
        """The options the command line set; neither the file nor the environment overrides them."""
        self.sources: dict[str, str] = {}
        """Where each option that came from the file or the environment came from, for errors."""

    def parseOptions(self, options=None):
        self.given = self._named_by(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def _named_by(self, argv: list[str]) -> set[str]:
        """The long names of the options argv sets, found as usage.Options finds them."""
        try:
            opts, _ = getopt.getopt(argv, self.shortOpt, self.longOpt)
        except getopt.GetoptError:
            return set()  # usage.Options raises the same error as a UsageError
        named = set()
        for opt, _ in opts:
            opt = opt.lstrip("-")
            name = self.synonyms.get(opt) or self.synonyms.get(opt.replace("-", "_"))
            if name:
                named.add(name)
        return named

    def postOptions(self):
        self.merge_file_and_environment()
        try:
            self.check()
        except usage.UsageError as e:
            raise usage.UsageError(self._with_source(str(e))) from None

    def _with_source(self, message: str) -> str:
        """Name the file key or variable a rejected value came from."""
        named = re.match(r"--([a-z-]+)", message)
        if named and named[1] in self.sources:
            return f"{message} (from {self.sources[named[1]]})"
        return message

    def _coercions(self) -> dict:
        """Each parameter's coerce function, as usage.Options applies it (str if none)."""
        return {parameter[0]: (parameter[4] if len(parameter) > 4 and parameter[4] else str)
                for parameter in self.optParameters}

    def _options(self) -> tuple[set[str], set[str]]:
        flags = {flag[0] for flag in self.optFlags}
        parameters = {parameter[0] for parameter in self.optParameters} - {"config"}
        return flags, parameters

    def merge_file_and_environment(self) -> None:
        """Fill in what the command line left out: from AGENT_<OPTION>, else from the
        --config file, through the command line's own coercion."""
        flags, parameters = self._options()
        path = self["config"]
        source = "--config"
        if "config" not in self.given and self.environ.get(env_name("config")):
            path, source = self.environ[env_name("config")], env_name("config")
        from_file = self._read_config(path, source, flags | parameters) if path else {}
        for name in sorted(flags | parameters):
            if name in self.given:
                continue
            if env_name(name) in self.environ and name not in NOT_FROM_ENVIRONMENT:
                where, value = env_name(name), self.environ[env_name(name)]
                if name in flags:
                    word = value.strip().lower()
                    if word not in FLAG_WORDS:
                        raise usage.UsageError(
                            f"{where}={value!r}: a flag is 1, 0, true, false, yes or no")
                    self[name] = FLAG_WORDS[word]
                else:
                    self._coerce(name, value, where)
            elif name in from_file:
                key, value = from_file[name]
                where = f"{path}, key {key}"
                if name in flags:
                    if not isinstance(value, bool):
                        raise usage.UsageError(f"{where}: a flag is true or false, not {value!r}")
                    self[name] = int(value)
                else:
                    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                        raise usage.UsageError(
                            f"{where}: expected a string or a number, not {value!r}")
                    self._coerce(name, str(value), where)
            else:
                continue
            self.sources[name] = where

    def _coerce(self, name: str, value: str, where: str) -> None:
        try:
            self[name] = self._coercions()[name](value)
        except ValueError as e:
            raise usage.UsageError(f"{where}: bad value {value!r} for --{name}: {e}") from None

    @staticmethod
    def _read_config(path: str, source: str, known: set[str]) -> dict[str, tuple[str, object]]:
        """The file's options by long name, each with the key as spelled there."""
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except FileNotFoundError:
            raise usage.UsageError(f"{source} {path}: no such file") from None
        except OSError as e:
            raise usage.UsageError(f"{source} {path}: cannot read it: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise usage.UsageError(f"{source} {path}: not valid TOML: {e}") from None
        options: dict[str, tuple[str, object]] = {}
        unknown = []
        for key, value in table.items():
            name = key.replace("_", "-")
            if name not in known:
                unknown.append(key)
            elif name in options:
                raise usage.UsageError(
                    f"{path}: {options[name][0]} and {key} are the same option")
            else:
                options[name] = (key, value)
        if unknown:
            raise usage.UsageError(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} "
                                   + ", ".join(sorted(unknown))
                                   + " (keys are the long option names of twistd agent --help)")
        return options

    def check(self):
        """The command line's checks, on the merged values."""
        if self["timeout-unit"] not in TIMEOUT_UNITS:
            raise usage.UsageError("--timeout-unit must be s or ms")
        if self["log-format"] not in ("text", "json"):
            raise usage.UsageError("--log-format must be text or json")
        if self["protected-mode"] not in ("yes", "no"):
            raise usage.UsageError("--protected-mode must be yes or no")
        if self["parallel"] < 0:
            raise usage.UsageError("--parallel must be 0 (unlimited) or more")
        if self["when-busy"] not in ("reject", "queue"):
            raise usage.UsageError("--when-busy must be reject or queue")
        if self["log-tasks"] not in LOG_TASKS:
            raise usage.UsageError("--log-tasks must be all, failures or none")
        if self["max-queue-bytes"] < 0:
            raise usage.UsageError("--max-queue-bytes must be 0 (no bound) or more")
        if self["max-queue"] < 0:
            raise usage.UsageError("--max-queue must be 0 (no bound) or more")
        if self["max-line"] < 64:
            raise usage.UsageError("--max-line must be at least 64 bytes")
        if self["max-output-bytes"] < 1:
            raise usage.UsageError("--max-output-bytes must be at least 1")
        if self["max-pending-output"] < 0:
            raise usage.UsageError("--max-pending-output must be 0 (no bound) or a size in bytes")
        if self["max-connections"] < 0:
            raise usage.UsageError("--max-connections must be 0 (no cap) or more")
        if not 0 <= self["line-timeout"] < float("inf"):
            raise usage.UsageError("--line-timeout must be 0 (none) or a number of seconds")
        if self["max-running"] < 0:
            raise usage.UsageError("--max-running must be 0 (unlimited) or more")
        if self["max-log-bytes"] < 1:
            raise usage.UsageError("--max-log-bytes must be at least 1")
        if not 0 <= self["kill-grace"] < float("inf"):
            raise usage.UsageError("--kill-grace must be a non-negative number of seconds")
        if not 0 <= self["shutdown-grace"] < float("inf"):
            raise usage.UsageError("--shutdown-grace must be a non-negative number of seconds")
        if not 0 <= self["keep-days"] < float("inf"):
            raise usage.UsageError("--keep-days must be 0 (no age limit) or a number of days")
        if self["keep-bytes"] < 0:
            raise usage.UsageError("--keep-bytes must be 0 (no size limit) or a size in bytes")
        self.check_fleet()
        self.admin_token_wanted = self["token-file"] is not None or self["tokens-file"] is None
        """An admin token file is used when named, or when no tokens file replaces it."""
        if self["token-file"] is None:
            self["token-file"] = os.path.join(self["data-dir"], "token")
        self.check_token_files()
        self.allow = None
        if self["allow-file"] is not None:
            from agent.core.allowlist import AllowList, BadAllowList
            try:
                self.allow = AllowList.load(Path(self["allow-file"]))
            except BadAllowList as e:
                raise usage.UsageError(str(e)) from None

    def check_fleet(self) -> None:
        """The fleet's options: a readable DSN and password file, labels, a sane lease."""
        self.labels = parse_labels(self["labels"])
        self.fleet_dsn = None
        if self["fleet"] is None:
            for name in ("fleet-password-file", "node-id", "fleet-url"):
                if self[name] is not None:
                    raise usage.UsageError(f"--{name} needs --fleet")
            return
        from agent.fleet import dsn as dsns  # psycopg: only for an agent in a fleet
        if not 1.0 <= self["fleet-lease"] <= 3600:
            raise usage.UsageError("--fleet-lease must be between 1 and 3600 seconds")
        if not 0.05 <= self["fleet-poll"] <= 3600:
            raise usage.UsageError("--fleet-poll must be between 0.05 and 3600 seconds")
        try:
            dsn = dsns.with_password_file(self["fleet"], self["fleet-password-file"])
            self.fleet_dsn = dsns.for_node(dsn, self["fleet-lease"])
        except OSError as e:
            raise usage.UsageError(f"--fleet-password-file: cannot read it: {e.strerror}") from None
        except dsns.BadDsn as e:
            raise usage.UsageError(str(e)) from None
        if self["fleet-url"] is not None:
            self["fleet-url"] = check_fleet_url(self["fleet-url"])
        if self["node-id"] is None:
            self["node-id"] = default_node_id(self["data-dir"])
        from agent.core.request import InvalidRequest, task_id
        try:
            task_id(self["node-id"], "--node-id")
        except InvalidRequest as e:
            raise usage.UsageError(e.message) from None

    def check_token_files(self) -> None:
        """Refuse at start, with how to fix it, a token that is short or readable by others
        (as ssh does for keys) and a tokens file that is malformed."""
        from agent.doors.http.auth import NoToken, read_token, read_tokens_file
        self.principals = {}
        try:
            if self["tokens-file"] is not None:
                self.principals = read_tokens_file(Path(self["tokens-file"]))
            if self.admin_token_wanted and os.path.exists(self["token-file"]):
                read_token(Path(self["token-file"]))
        except NoToken as e:
            raise usage.UsageError(str(e)) from None


_LABEL = re.compile(r"[A-Za-z0-9_.\-/]+")


def parse_labels(text: str) -> dict[str, str]:
    """"os=linux,gpu=a100" as {"os": "linux", "gpu": "a100"}."""
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, equals, value = item.partition("=")
        if not equals or not _LABEL.fullmatch(name) or not _LABEL.fullmatch(value):
            raise usage.UsageError(
                f"--labels: {item!r} is not name=value (letters, digits, _ . - / only)")
        if name in labels:
            raise usage.UsageError(f"--labels: {name} is given twice")
        labels[name] = value
    return labels


def check_fleet_url(url: str) -> str:
    """An http(s)://HOST[:PORT][/PREFIX] URL, without a trailing slash."""
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(url)
        parts.port  # a port that is not a number raises here
    except ValueError:
        parts = None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
            or parts.query or parts.fragment or any(c.isspace() for c in url)):
        raise usage.UsageError(f"--fleet-url must look like https://HOST:PORT, not {url!r}")
    return url.rstrip("/")


def default_node_id(data_dir: str) -> str:
    """The host name and a digest of the data dir: two agents on one host differ, and an
    agent restarted on the same data dir is the same node."""
    import hashlib
    import socket
    where = os.path.realpath(data_dir).encode("utf-8", "surrogateescape")
    return f"{socket.gethostname()}-{hashlib.sha256(where).hexdigest()[:8]}"
