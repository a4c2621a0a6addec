"""agentctl's command line: its commands, options, help and examples (argparse)."""
from __future__ import annotations

import argparse

from agent.clients.agentapi import DEFAULT_TOKEN_FILE, DEFAULT_URL

STATES = ("queued", "running", "succeeded", "failed", "timed_out", "cancelled", "lost")
DOORS = ("tcp", "http")

DESCRIPTION = f"""\
The agent's HTTP API from a terminal: list, start, follow, cancel and purge tasks.

The agent is --url (or $AGENT_URL, else {DEFAULT_URL}), its token the first
line of --token-file (or $AGENT_TOKEN_FILE, else {DEFAULT_TOKEN_FILE}): the
agent of `make run` in this directory needs neither."""

EPILOG = """\
examples:
  agentctl run -- sh -c 'echo out; echo err >&2; exit 3'; echo $?
  agentctl run --timeout 60 --env LANG=C -- make -C /srv/app test
  agentctl tasks --state failed --limit 5
  agentctl tasks --door tcp --json
  ID=$(agentctl start -- sleep 600); agentctl logs -f --both $ID
  agentctl cancel $ID && agentctl purge $ID
  AGENT_URL=http://node7:8080 AGENT_TOKEN_FILE=~/.agent/node7 agentctl health

exit status: 0 done; 2 bad arguments; 125 the agent or the network failed;
`run`: the task's own status, or 124 timed out, 125 the agent failed,
126 could not start, 127 no such program, 130 cancelled (Ctrl-C cancels it);
`health`: 1 while the agent is degraded."""

RUN_EPILOG = """\
examples:
  agentctl run -- python3 -c 'print("hello")'
  agentctl run --timeout 2.5 -- sleep 10      # exits 124
  agentctl run --env MODE=fast -- /srv/app/bench.sh

stdout and stderr come as the task writes them; Ctrl-C cancels the task
(exit 130). Exit status: the task's own, or 124 timed out, 125 the agent or
the network failed, 126 could not start, 127 no such program, 130 cancelled,
128+N killed by signal N."""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS,
                        help=f"the agent's HTTP API (env AGENT_URL; default {DEFAULT_URL})")
    common.add_argument("--token-file", default=argparse.SUPPRESS, metavar="FILE",
                        help="a file whose first line is the bearer token "
                             f"(env AGENT_TOKEN_FILE; default {DEFAULT_TOKEN_FILE})")
    common.add_argument("--ca", default=argparse.SUPPRESS, metavar="PEM",
                        help="with an https:// --url: the CA that signed the agent's "
                             "certificate (env AGENT_CA; default: the system's)")
    common.add_argument("--cert", default=argparse.SUPPRESS, metavar="PEM",
                        help="a client certificate, for an agent on an mtls: door (env AGENT_CERT)")
    common.add_argument("--key", default=argparse.SUPPRESS, metavar="PEM",
                        help="its private key, if not in the --cert file (env AGENT_KEY)")
    parser = argparse.ArgumentParser(prog="agentctl", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, epilog=None, listing=False):
        sub = commands.add_parser(name, help=help, description=help, epilog=epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter, parents=[common])
        if listing:
            sub.add_argument("--json", action="store_true", help="print the API's JSON")
        return sub

    tasks = command("tasks", "list tasks, newest first", listing=True,
                    epilog="example:\n  agentctl tasks --state running --door http")
    tasks.add_argument("--state", choices=STATES, help="only tasks in this state")
    tasks.add_argument("--door", choices=DOORS, help="only tasks started through this door")
    tasks.add_argument("--limit", type=_positive_int, default=50, metavar="N",
                       help="at most N tasks (default 50)")

    command("show", "one task's record", listing=True).add_argument("id", metavar="ID")

    _task_arguments(command("run", "run a command on the agent, its output streamed here, "
                                   "exiting with its status", RUN_EPILOG))
    _task_arguments(command("start", "start a command and print its id", listing=True,
                            epilog="example:\n  ID=$(agentctl start -- sleep 600)"))
    for name in ("run", "start"):
        commands.choices[name].usage = f"agentctl {name} [options] -- CMD ARG..."

    logs = command("logs", "print a task's output", epilog=(
        "examples:\n  agentctl logs $ID\n  agentctl logs -f --both $ID   "
        "# until the task ends, resuming if the connection drops"))
    logs.add_argument("-f", "--follow", action="store_true",
                      help="keep printing as the task writes, until it ends")
    which = logs.add_mutually_exclusive_group()
    which.add_argument("--stderr", action="store_true", help="the task's stderr instead of its stdout (printed on stdout)")
    which.add_argument("--both", action="store_true", help="both: its stdout on stdout, its stderr on stderr")
    logs.add_argument("id", metavar="ID")

    command("cancel", "cancel a queued or running task (SIGTERM, then SIGKILL)",
            listing=True).add_argument("id", metavar="ID")
    command("purge", "remove an ended task's record and output for good",
            listing=True).add_argument("id", metavar="ID")
    command("health", "the agent's health (no token needed); exits 1 while degraded",
            listing=True)
    return parser


def _task_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--timeout", type=_seconds, metavar="S",
                     help="seconds the task may run (fractions allowed; default: no limit)")
    sub.add_argument("--env", type=_variable, action="append", metavar="K=V",
                     help="add an environment variable (repeatable)")
    sub.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARG...",
                     help="the program and its arguments: an argv, never a shell line")
    sub.set_defaults(check=lambda args: _argv_given(sub, args))


def _argv_given(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse alone cannot say: a run or start without a command."""
    if args.argv[:1] == ["--"]:
        args.argv = args.argv[1:]
    if not args.argv:
        parser.error(f"give the command after --, as in agentctl {args.command} -- echo hello")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, 0 or more, "
                                         f"not {text}")
    return value


def _variable(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"must be NAME=VALUE, not {text!r}")
    return name, value


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if hasattr(args, "check"):
        args.check(args)
    return args
