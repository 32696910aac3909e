#!/usr/bin/env python3
"""Render reliability-results.json (written by tests/reliability) as Markdown tables.

    python scripts/reliability_report.py [reliability-results.json]

One summary table across backends, then one table per backend with a row per
test. Paste the output into docs/reliability.md after a full run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# (column header, figure names summed into it)
COLUMNS = [
    ("jobs fired", ("fired",)),
    ("lost", ("lost",)),
    ("duplicate executions", ("duplicates",)),
    ("worker kills survived", ("worker_kills",)),
    ("server restarts survived", ("server_restarts",)),
    ("bad inputs tried", ("bad_inputs",)),
]
NOTE_SKIP = {"at", *(name for _, names in COLUMNS for name in names)}


def _cell(numbers: dict[str, Any], names: tuple[str, ...]) -> str:
    values = [numbers[n] for n in names if n in numbers]
    return str(sum(values)) if values else "–"


def _total(tests: dict[str, dict[str, Any]], names: tuple[str, ...]) -> int:
    return sum(numbers.get(n, 0) for numbers in tests.values() for n in names)


def _notes(numbers: dict[str, Any]) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(numbers.items()) if k not in NOTE_SKIP)


def render(data: dict[str, Any]) -> str:
    backends: dict[str, Any] = data.get("backends", {})
    out = [f"Results of the last run (updated {data.get('updated', '?')}).", ""]
    out.append("| backend | " + " | ".join(h for h, _ in COLUMNS) + " |")
    out.append("|---|" + "---:|" * len(COLUMNS))
    for label, entry in sorted(backends.items()):
        tests = entry.get("tests", {})
        out.append(f"| {label} | " + " | ".join(str(_total(tests, names)) for _, names in COLUMNS) + " |")
    for label, entry in sorted(backends.items()):
        tests = entry.get("tests", {})
        out += ["", f"### {label}", "", "| test | " + " | ".join(h for h, _ in COLUMNS) + " | details |",
                "|---|" + "---:|" * len(COLUMNS) + "---|"]
        for name, numbers in sorted(tests.items()):
            out.append(f"| {name} | " + " | ".join(_cell(numbers, names) for _, names in COLUMNS)
                       + f" | {_notes(numbers)} |")
        out.append("| **total** | " + " | ".join(f"**{_total(tests, names)}**" for _, names in COLUMNS) + " | |")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    path = Path(argv[1]) if len(argv) > 1 else ROOT / "reliability-results.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        print(f"{path} does not exist: run `make test` (or pytest tests/reliability) first.", file=sys.stderr)
        return 1
    sys.stdout.write(render(data))
    lost = sum(_total(e.get("tests", {}), ("lost",)) for e in data.get("backends", {}).values())
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
