"""Runs of the kit's periodic jobs, counted outside the queue.

Each run appends ``slot started-at pid id name`` to the file named by
``$SKUNQ_KIT_TICKS``; the kit reads the file back with :func:`read_runs`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from skunkqueue.context import current_job
from skunkqueue.testing.clocks import true_time
from skunkqueue.testing.kit import append_line

TICKS_ENV = "SKUNQ_KIT_TICKS"


def note_run() -> float:
    """Append this run's line: its slot, when it started on this host's real clock (a skewed
    pool's too), the worker's pid, the job's id and function."""
    started = true_time()
    ctx = current_job()
    if ctx is None:
        raise RuntimeError("note_run() is for the kit's periodic jobs, run by a worker")
    slot = None if ctx.slot is None else ctx.slot.timestamp()
    append_line(os.environ[TICKS_ENV], f"{slot!r} {started!r} {os.getpid()} {ctx.id} {ctx.function}")
    return started


@dataclass(frozen=True)
class Run:
    slot: float
    started: float
    pid: int
    id: str
    function: str


def read_runs(path: Path) -> list[Run]:
    runs = []
    for line in (path.read_text() if path.exists() else "").splitlines():
        slot, started, pid, job_id, function = line.split()
        runs.append(Run(float(slot), float(started), int(pid), job_id, function))
    return runs
