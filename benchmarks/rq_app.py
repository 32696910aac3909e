"""RQ's job for the comparison: ``rq worker`` imports ``benchmarks.rq_app.noop`` by name."""

from __future__ import annotations

from typing import Any

QUEUE = "skunqbench"


def noop(i: Any) -> Any:
    return i
