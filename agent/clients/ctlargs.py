"""agentctl's command line: its commands, options, help and examples (argparse)."""
from __future__ import annotations

import argparse

from agent.clients.agentapi import DEFAULT_TOKEN_FILE, DEFAULT_URL

STATES = ("queued", "running", "succeeded", "failed", "timed_out", "cancelled", "lost")
DOORS = ("tcp", "http")
FLEET_STATES = ("queued", "running", "finished", "cancelled", "lost")

DESCRIPTION = f"""\
The agent's HTTP API from a terminal: list, start, follow, cancel and purge tasks;
on an agent started with --fleet, the fleet's nodes and tasks too.

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
  agentctl nodes
  agentctl fleet submit --id nightly-42 --label os=linux -- make -C /srv/app test
  agentctl fleet show nightly-42

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
    command("nodes", "the fleet's nodes (an agent started with --fleet)", listing=True)
    _fleet_commands(command("fleet", "the fleet's tasks, through an agent started with --fleet",
                            epilog=FLEET_EPILOG), common)
    return parser


FLEET_EPILOG = """\
examples:
  agentctl fleet submit -- make test              # prints the new task's key
  agentctl fleet submit --id nightly-42 --timeout 600 --label os=linux -- make test
  agentctl fleet list --state running
  agentctl fleet show nightly-42                  # attempts, output tails, where the rest is
  agentctl fleet cancel nightly-42"""


def _fleet_commands(fleet: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    commands = fleet.add_subparsers(dest="fleet_command", required=True, metavar="COMMAND")

    def command(name, help, epilog=None):
        sub = commands.add_parser(name, help=help, description=help, epilog=epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  parents=[common])
        sub.add_argument("--json", action="store_true", help="print the API's JSON")
        return sub

    listing = command("list", "the fleet's tasks, newest first")
    listing.add_argument("--state", choices=FLEET_STATES, help="only tasks in this state")
    listing.add_argument("--node", metavar="NODE", help="only tasks last run on this node")
    listing.add_argument("--limit", type=_positive_int, default=50, metavar="N",
                         help="at most N tasks (default 50)")
    command("show", "one fleet task: its attempts, the tails of its output and where the "
                    "whole output is").add_argument("task_key", metavar="KEY")
    submit = command("submit", "queue a task for the fleet and print its key",
                     epilog="example:\n  agentctl fleet submit --id build-7 -- make test")
    submit.add_argument("--id", metavar="KEY",
                        help="its key: a key already used with the same command attaches to "
                             "that task, with another one is refused (default: a new key)")
    submit.add_argument("--timeout", type=_seconds, metavar="S",
                        help="seconds it may run (default: no limit)")
    submit.add_argument("--label", type=_variable, action="append", metavar="K=V",
                        help="a node label it needs (repeatable)")
    submit.add_argument("--max-attempts", type=_positive_int, metavar="N",
                        help="starts on some node before it is lost (default 3)")
    submit.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARG...",
                        help="the program and its arguments: an argv, never a shell line")
    submit.usage = "agentctl fleet submit [options] -- CMD ARG..."
    submit.set_defaults(check=lambda args: _argv_given(submit, args))
    command("cancel", "cancel a fleet task: a queued one at once, a running one by its "
                      "node").add_argument("task_key", metavar="KEY")


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
        name = " ".join(filter(None, (args.command, getattr(args, "fleet_command", None))))
        parser.error(f"give the command after --, as in agentctl {name} -- echo hello")


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
