"""The agent's two log formats: twistd's text lines, made cheaper, and --log-format json.

twistd asks the application for an ILogObserver component before it makes its
own text observer (twisted.application.app.AppLogger.start), so the agent sets
one on the application it is given (AgentService.setServiceParent).

text: twistd's own lines (formatEventAsClassicLogText), to the file twistd
would write them to (text_log_destination), with the time's text made once a
second and a PREFORMATTED event's line put together directly. twistd's
observer formats every line's time with strftime and a time zone computed for
it, and its message with string.Formatter: with a line per task, this observer
cut the agent's CPU a task by 13% under load (docs/benchmarks.md).

json: {"time": RFC 3339 UTC, "level", "namespace", "message", "fields": {...}};
the fields are the event's own keys (id, exit_code, peer...), never Twisted's
log_* bookkeeping, and anything that is not JSON is written as its text.
"""
from __future__ import annotations

import json
import signal
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

from twisted.logger import (FileLogObserver, ILogObserver, formatEvent,
                            formatEventAsClassicLogText, formatTime)
from twisted.python.logfile import LogFile
from zope.interface import implementer

FORMATS = ("text", "json")

PREFORMATTED = "{text}"
"""The log_format of an event whose message is already formatted, in its "text" key.
A hot path's line (one per task) formats one field instead of six with Twisted's
pure-Python formatter, which measured 62 -> 41 us a line; the event keeps its
other keys as fields, and "text" is not one of them."""


class ClassicText:
    """formatEventAsClassicLogText's lines ("TIME [namespace#level] message"), byte for
    byte, for a FileLogObserver: the time's text is made when the second changes, and a
    PREFORMATTED event without a failure skips the formatter altogether."""

    def __init__(self):
        self._second: int | None = None
        self._time_text = "-"

    def __call__(self, event: dict) -> str | None:
        text = event.get("text")
        if event.get("log_format") != PREFORMATTED or not isinstance(text, str) \
                or "log_failure" in event or "log_system" in event:
            return formatEventAsClassicLogText(event, formatTime=self.time_text)
        if not text:
            return None
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        text = text.replace("\n", "\n\t")
        return f"{self.time_text(event.get('log_time'))} [{system}] {text}\n"

    def time_text(self, when: float | None) -> str:
        """twistd's formatTime, once a second: the text of a time is its second's."""
        if when is None:
            return "-"
        second = int(when // 1)
        if second != self._second:
            self._second, self._time_text = second, formatTime(when)
        return self._time_text


def text_log_destination(server_options: Any, reactor) -> Any:
    """The file twistd would write its text log to for these options (as
    twisted.scripts._twistd_unix.UnixAppLogger does), with log rotation on SIGUSR1 as
    it sets up; None where twistd does something else (--syslog, --logger, a daemon
    told to log to stdout), so that it still does."""
    if server_options is None or server_options.get("syslog") or server_options.get("logger"):
        return None
    name, nodaemon = server_options.get("logfile"), server_options.get("nodaemon")
    if name == "-" or (nodaemon and not name):
        return sys.stdout if nodaemon else None  # twistd itself refuses a daemon on stdout
    log_file = LogFile.fromFullPath(name or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):
        signal.signal(signal.SIGUSR1,
                      lambda *_: reactor.callFromThread(log_file.rotate))
    return log_file


def text_observer(out) -> FileLogObserver:
    """twistd's text log observer, for the file it would write to, made cheaper."""
    return FileLogObserver(out, ClassicText())


@implementer(ILogObserver)
class JsonLines:
    def __init__(self, out: TextIO | None = None):
        """out: the process's stdout as it is now; once logging starts, twistd replaces
        sys.stdout with a file that logs what is written to it."""
        self._out = out if out is not None else sys.stdout

    def __call__(self, event: dict) -> None:
        self._out.write(json_line(event) + "\n")
        self._out.flush()


def json_line(event: dict) -> str:
    level = event.get("log_level")
    failure = event.get("log_failure")
    record = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc)
        .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
        "fields": {key: _plain(value) for key, value in event.items()
                   if not key.startswith("log_") and key not in ("format", "message",
                                                                  "isError", "system", "time")},
    }
    if event.get("log_format") == PREFORMATTED:
        record["fields"].pop("text", None)
    if failure is not None:
        record["failure"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False, default=str)


def _plain(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return str(value)
