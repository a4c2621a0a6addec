"""The agent's options: `twistd agent --help` is their reference."""
from __future__ import annotations

import os
from pathlib import Path

from twisted.python import usage

from agent.core.engine import LOG_TASKS
from agent.doors.tcp.wire import TIMEOUT_UNITS
from agent.history.retention import parse_size


class Options(usage.Options):
    optParameters = [
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
         "tasks are pruned at start and hourly. 0 = no size limit.", parse_size],
    ]

    optFlags = [
        ["keep-tcp-output", None,
         "Keep the output of TCP tasks without an id in the history too, under --max-log-bytes "
         "(HTTP tasks' and TCP tasks with an id always keep theirs); without it their records "
         "count the bytes but keep none."],
    ]

    def postOptions(self):
        if self["timeout-unit"] not in TIMEOUT_UNITS:
            raise usage.UsageError("--timeout-unit must be s or ms")
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
