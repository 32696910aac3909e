"""The jobs the benchmark fires. Workers import them by name (``benchmarks.jobs:noop``).

They are declared on a placeholder queue; the benchmark binds the same
functions to the queue under test (see :func:`bind`), which gives them the
same name, so a worker of any backend resolves them here.
"""

from __future__ import annotations

from typing import Any

from skunkqueue import Job, SkunkQueue

_declared = SkunkQueue("skunkqueue-bench")


@_declared.event(routes=["bench"])
def noop(i: Any) -> Any:
    """Does nothing but hand its argument back, so results can be checked."""
    return i


def bind(queue: SkunkQueue, job: Job, route: str) -> Job:
    """``job``'s function as a Job of ``queue`` on ``route``."""
    return Job(queue, job.func, [route])
