"""Run the benchmark suite and print one table.

    python -m bench                  # every case, full sizes (under 3 minutes on 2 cores)
    python -m bench --quick          # tiny sizes: checks that everything runs, in seconds
    python -m bench --only serial,startup
    python -m bench --only tcp       # groups: tcp, http, startup

The table is also written as JSON (bench/results.json unless --json says otherwise).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench import cases_http, cases_tcp
from bench.agentproc import AGENT_REPO_VARIABLE, agent_repo
from bench.table import Row, machine, markdown, write_json

CASES = {
    "serial": cases_tcp.serial,
    "parallel": cases_tcp.parallel,
    "concurrency": cases_tcp.concurrency,
    "output": cases_tcp.large_output,
    "endless": cases_http.endless_output,
    "follow": cases_http.follow_latency,
    "history": cases_http.history,
    "startup": cases_tcp.startup,
}
GROUPS = {
    "tcp": ["serial", "parallel", "concurrency", "output"],
    "http": ["endless", "follow", "history"],
}
DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, for CI: checks the suite runs, not the figures")
    parser.add_argument("--only", default="",
                        help=f"comma-separated cases or groups: {', '.join([*CASES, *GROUPS])}")
    parser.add_argument("--json", type=Path, default=None,
                        help=f"where to write the results (default {DEFAULT_JSON}; "
                             "a --quick or --only run writes nowhere unless asked)")
    parser.add_argument("--agent-repo", type=Path, default=None,
                        help="benchmark the agent of another checkout (default: this one)")
    args = parser.parse_args(argv)
    args.cases = _selected(args.only)
    return args


def _selected(only: str) -> list[str]:
    if not only:
        return list(CASES)
    names = []
    for word in filter(None, (w.strip() for w in only.split(","))):
        if word in GROUPS:
            names += GROUPS[word]
        elif word in CASES:
            names.append(word)
        else:
            raise SystemExit(f"unknown case {word!r}: choose from {', '.join([*CASES, *GROUPS])}")
    return [name for name in CASES if name in names]


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.agent_repo is not None:
        os.environ[AGENT_REPO_VARIABLE] = str(args.agent_repo.resolve())
    sizes = cases_tcp.QUICK if args.quick else cases_tcp.FULL
    began = time.perf_counter()
    rows: list[Row] = []
    for name in args.cases:
        started = time.perf_counter()
        print(f"# {name} ...", file=sys.stderr, flush=True)
        rows += CASES[name](sizes)
        print(f"# {name} took {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    took = time.perf_counter() - began
    info = {**machine(), "agent_repo": str(agent_repo())}
    print(f"\nagent benchmarks{' (--quick)' if args.quick else ''}: {info['cpu']}, "
          f"{info['cores']} cores, Python {info['python']}, Twisted {info['twisted']}; "
          f"{took:.0f} s\n")
    print(markdown(rows))
    target = args.json if args.json is not None else (
        DEFAULT_JSON if not args.quick and not args.only else None)
    if target is not None:
        write_json(target, rows, {"quick": args.quick, "cases": args.cases, "seconds": round(took, 1),
                                  "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                  "machine": info})
        print(f"\nwritten to {target}")
    return 0
