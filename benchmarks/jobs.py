"""The jobs the benchmark fires. Workers import them by name (``benchmarks.jobs:noop``).

Workers import this module (``--import benchmarks.jobs``) with the queue and
route under test in their environment, so the job is declared where they
look for it (a worker runs only jobs declared on its own queue and route);
the producer binds the same function to that queue (see :func:`bind`).
"""

from __future__ import annotations

from typing import Any

from skunkqueue import Job, SkunkQueue
from skunkqueue.testing.kit import kit_queue, kit_routes

_declared = kit_queue("skunkqueue-bench")


@_declared.event(routes=kit_routes(["bench"]))
def noop(i: Any) -> Any:
    """Does nothing but hand its argument back, so results can be checked."""
    return i


def bind(queue: SkunkQueue, job: Job, route: str) -> Job:
    """``job``'s function as a Job of ``queue`` on ``route``."""
    return Job(queue, job.func, [route])


@_declared.event(routes=kit_routes(["bench"]))
def count(results: list[Any]) -> int:
    """A chord's callback: how many member results it was given (the workflow row checks it)."""
    return len(results)
