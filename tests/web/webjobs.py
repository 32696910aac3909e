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


@queue.event(routes=["fast"])
def flaky(name: str, failures: int) -> int:
    """Fails its first ``failures`` runs (counted in $WEBTEST_RUNS under ``name``), then returns the run's number."""
    _ran(name)
    path = os.environ.get("WEBTEST_RUNS", "")
    runs = sum(1 for line in Path(path).read_text().splitlines() if line.split()[0] == name) if path else 0
    if runs <= failures:
        raise TimeoutError(f"{name}: run {runs} timed out")
    return runs


@queue.event(routes=["fast"])
async def asleep(seconds: float) -> float:
    import asyncio

    _ran("asleep")
    await asyncio.sleep(seconds)
    return seconds


@queue.event(routes=["fast"])
def slow(seconds: float) -> float:
    _ran("slow")
    time.sleep(seconds)
    return seconds
