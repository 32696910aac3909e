"""Jobs the monitor's tests fire; every run appends a line to $WEBTEST_RUNS, outside the queue."""

from __future__ import annotations

import os
import time
from pathlib import Path

from skunkqueue import SkunkQueue

queue = SkunkQueue(os.environ.get("WEBTEST_QUEUE", "webtest"), backend=os.environ.get("SKUNQ_BACKEND"),
                   conn_url=os.environ.get("SKUNQ_URL"))


def _ran(name: str) -> None:
    path = os.environ.get("WEBTEST_RUNS")
    if path:
        with open(path, "a") as f:
            f.write(f"{name} {os.getpid()}\n")


@queue.event(routes=["fast"])
def add(a: int, b: int) -> int:
    _ran("add")
    time.sleep(0.02)
    return a + b


@queue.event(routes=["fast"])
def boom(text: str) -> None:
    _ran("boom")
    raise ValueError(f"cannot handle {text}")


@queue.event(routes=["fast"])
def needs_file(path: str) -> str:
    """Fails until the test creates ``path``: a dead letter that a retry can fix."""
    _ran("needs_file")
    if not Path(path).exists():
        raise FileNotFoundError(f"{path} is not there yet")
    return "fixed"
