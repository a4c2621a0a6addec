"""schemathesis, every check on, against a real agent's /openapi.json.

`st run` generates requests from the document (its examples, boundary values,
random and invalid data, sequences that follow the links it infers from the
responses) and holds each answer to the document: no 500; no request the
document allows refused, so the document states every rule the agent enforces;
no request it forbids accepted; statuses, headers, content types and bodies as
documented; the bearer token required where the document says; 405 with Allow
for a method no path has.

The agent may run what schemathesis generates, for real: its allow-list admits
only /bin/true and /bin/echo (with any arguments), so nothing else can start.
The run is bounded (a fixed number of examples per operation, one seed,
deterministic generation, one worker) and takes about 20 s. The fleet's paths answer
404 on that agent (it is in no fleet); a second, shorter run (about 10 s) holds them to
the document on an agent in a fleet, on the suite's PostgreSQL.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

from tests.e2e.conftest import REPO

ALLOW = """
[[allow]]
program = "/bin/true"

[[allow]]
program = "/bin/echo"
"""

CONFIG = """
hooks = "tests.e2e.schemathesis_hooks"

[auth.openapi.bearer]
bearer = "${AGENT_TOKEN}"

# Half the generated commands are programs the allow-list admits, so tasks
# really run and the stateful phase follows real ids; the rest are refused (403).
[dictionaries.programs]
values = ["echo", "true", "/bin/echo", "/bin/true"]

[parameters]
"body.command" = { dictionary = "programs", probability = 0.5 }

# The stateful phase follows the document's own links, not links it infers: an
# inferred link would DELETE a task that may still run, a cancel that leaves it in the
# history, which the use_after_free check takes for a removal (the document's link purges).
[phases.stateful.inference]
algorithms = []
"""

EXAMPLES = 30
"""Per operation and phase: enough to find what the first runs found, in about 20 s."""


def test_every_answer_is_as_the_openapi_document_says(start_agent, tmp_path):
    agent, report, operations = _run(start_agent, tmp_path)
    assert f"{operations} selected / {operations} total" in report, report
    assert '"POST /tasks HTTP/1.1" 201' in agent.log, "no generated task ever started"
    assert '"POST /tasks HTTP/1.1" 403' in agent.log, "no generated command was ever refused"


def test_a_fleet_agent_answers_the_fleets_paths_as_the_document_says(start_agent, tmp_path,
                                                                    fleet_dsn):
    """The same run on the fleet's operations alone, on an agent in a fleet (elsewhere they
    answer 404): what it submits, the agent itself claims and runs (or refuses)."""
    agent, report, operations = _run(
        start_agent, tmp_path, "--fleet", fleet_dsn, "--fleet-poll", "0.2",
        st=["--include-path-regex", "^/fleet/"], examples=FLEET_EXAMPLES)
    fleet = sum(path.startswith("/fleet/") for _, path in operations_of(tmp_path))
    assert f"{fleet} selected / {operations} total" in report, report
    assert '"POST /fleet/tasks HTTP/1.1" 201' in agent.log, "no generated task was submitted"
    assert " 503 " not in agent.log, "the fleet database was not reachable"


FLEET_EXAMPLES = 20
"""Fewer: five operations, each a round trip to PostgreSQL."""


def _run(start_agent, tmp_path, *agent_args, st=(), examples=EXAMPLES):
    """An agent with the allow-list, and `st run` against the document it serves:
    (the agent, st's report, how many operations the document has). Fails on any finding."""
    (tmp_path / "allow.toml").write_text(ALLOW)
    data = tmp_path / "data"
    agent = start_agent("--http", "tcp:0:interface=127.0.0.1", "--data-dir", str(data),
                        "--allow-file", str(tmp_path / "allow.toml"), "--max-running", "4",
                        "--kill-grace", "0.5", *agent_args,
                        doors=("TCP task protocol", "HTTP API"))
    url = f"http://127.0.0.1:{agent.ports['HTTP API']}"
    token = (data / "token").read_text().strip()
    schema = tmp_path / "openapi.json"
    schema.write_bytes(_get(url + "/openapi.json", token))  # the one the agent serves
    (tmp_path / "schemathesis.toml").write_text(CONFIG)

    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", "schemathesis.toml", "--no-color",
         "run", str(schema), "--url", url, "--checks", "all", "--mode", "all",
         "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", str(examples),
         "--generation-deterministic",
         "--workers", "1", "--request-timeout", "10", *st],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO), AGENT_TOKEN=token),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)

    report = run.stdout + run.stderr
    assert run.returncode == 0, report + "\n--- agent log (tail) ---\n" + agent.log[-8000:]
    assert "Traceback" not in agent.log, agent.log
    return agent, report, len(operations_of(tmp_path))


def operations_of(tmp_path) -> list[tuple[str, str]]:
    return _operations(json.loads((tmp_path / "openapi.json").read_bytes()))


def _get(url: str, token: str) -> bytes:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def _operations(document: dict) -> list[tuple[str, str]]:
    return [(method, path) for path, item in document["paths"].items()
            for method in item if method != "parameters"]
