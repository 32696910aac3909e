"""Job functions the conformance kit fires; worker processes import them from here.

The kit re-declares each function on its own per-test queue; workers resolve
the name ``skunkqueue.testing.jobs:NAME`` to the Jobs below and call them.
"""

from __future__ import annotations

import os
import time
from typing import Any

from skunkqueue.queue import SkunkQueue

_kit = SkunkQueue("skunkqueue-testing")


@_kit.event(routes=["kit"])
def add(first: int, second: int) -> int:
    return first + second


@_kit.event(routes=["kit"])
def fail(message: str) -> None:
    raise ValueError(message)


@_kit.event(routes=["kit"])
def nap(seconds: float, marker: str | None = None) -> str:
    """Sleep; with ``marker``, append a line to that file first (counts starts)."""
    if marker:
        with open(marker, "a") as fh:
            fh.write(f"start {os.getpid()}\n")
    time.sleep(seconds)
    return "rested"


@_kit.event(routes=["kit"])
def mark(path: str, token: str) -> int:
    """Append ``token`` to ``path``: the side effect the kit counts executions by."""
    with open(path, "a") as fh:
        fh.write(token + "\n")
    return os.getpid()


@_kit.event(routes=["kit"])
def whoami() -> int:
    return os.getpid()


@_kit.event(routes=["kit"])
def unserializable() -> Any:
    return object()
