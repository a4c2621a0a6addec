"""One row per measured figure, printed as a Markdown table and saved as JSON."""
from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

MIB = 1 << 20


@dataclass
class Row:
    """A figure of the agent, its baseline, and whether it meets its target.

    passed is None for a case that was skipped; then `agent` says why.
    """

    case: str
    agent: str
    baseline: str = "-"
    ratio: str = "-"
    target: str = "-"
    passed: bool | None = None
    values: dict = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "FAIL", None: "skipped"}[self.passed]


def skipped(case: str, reason: str, target: str = "-") -> Row:
    return Row(case, f"skipped: {reason}", target=target)


def markdown(rows: list[Row]) -> str:
    header = ["case", "agent", "baseline", "ratio", "target", "result"]
    body = [[r.case, r.agent, r.baseline, r.ratio, r.target, r.verdict] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, body)])


def machine() -> dict:
    """What the figures were measured on: they mean little without it."""
    import twisted

    cpu = "unknown"
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "twisted": twisted.__version__,
            "executable": sys.executable}


def write_json(path: Path, rows: list[Row], meta: dict) -> None:
    """Write atomically, so an interrupted run never leaves half a results file."""
    document = {**meta, "rows": [{**asdict(r), "result": r.verdict} for r in rows]}
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document, indent=2) + "\n")
    temporary.replace(path)
