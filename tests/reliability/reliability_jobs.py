"""Job functions the reliability tests fire; worker processes import them from here.

Workers get this directory with ``--path`` and ``--import reliability_jobs``.
Inside a test's pool the jobs are declared on the test's queue and routes
(``kit_queue``/``kit_routes`` read them from the pool's environment), since a
worker runs only jobs declared on its own queue and route.
Every side effect is written to a file outside the queue, so the tests count
executions independently of what the queue recorded.
"""

from __future__ import annotations

import os
import signal
import time

from skunkqueue.queue import SkunkQueue
from skunkqueue.testing.clocks import true_time
from skunkqueue.testing.kit import append_line, kit_queue, kit_routes

_here = kit_queue("skunkqueue-reliability")
_routes = kit_routes(["a"])


@_here.event(routes=_routes)
def mark(path: str, token: str, pause: float = 0.0, stamps: str | None = None) -> str:
    """Record one execution of ``token`` (with a nonce), then sleep ``pause``.

    Returns ``pid:nonce``, so a test can check that the recorded outcome came
    from an execution that really happened. With ``stamps``, also log there when
    it started, by the host's true clock (this worker's may be skewed on purpose).
    """
    execution = f"{os.getpid()}:{os.urandom(6).hex()}"
    if stamps:
        append_line(stamps, f"{token} {true_time()!r}")
    append_line(path, f"{token} {execution}")
    if pause:
        time.sleep(pause)
    return execution


@_here.event(routes=_routes)
def fail_and_log(path: str) -> None:
    """Log the start time of this attempt, then fail."""
    append_line(path, repr(time.time()))
    raise ValueError("this attempt fails on purpose")


@_here.event(routes=_routes)
def hang_first_then_fail(path: str) -> None:
    """The first start hangs (so its worker can be killed); later starts fail."""
    append_line(path, f"start {os.getpid()}")
    with open(path) as fh:
        starts = fh.read().count("start")
    if starts == 1:
        time.sleep(120)
    raise ValueError(f"failed on start {starts}")


@_here.event(routes=_routes)
def kill_own_worker(path: str) -> None:
    """A poison job: takes its worker down with it, every time."""
    append_line(path, f"start {os.getpid()}")
    os.kill(os.getpid(), signal.SIGKILL)


@_here.event(routes=_routes)
def unserializable_result() -> object:
    return object()


@_here.event(routes=_routes)
def size_of(data: str) -> int:
    return len(data)


@_here.event(routes=_routes)
def fail_until_fixed(flag: str) -> str:
    """Fails until the file ``flag`` exists (an operator fixed the cause)."""
    if not os.path.exists(flag):
        raise RuntimeError(f"{flag} is missing")
    return "fixed"


# -- jobs a worker must refuse (tests/reliability/test_reliability_security.py) -----------

_other_tenant = SkunkQueue("skunkqueue-reliability-other-tenant")


@_other_tenant.event(routes=_routes)
def other_queue_job(path: str, token: str) -> None:
    """Declared on another queue: a worker of the test's queue must not run it."""
    append_line(path, f"{token} ran-on-the-wrong-queue")


@_here.event(routes=["admin-only"])
def other_route_job(path: str, token: str) -> None:
    """Declared on the test's queue, for a route no test pool serves."""
    append_line(path, f"{token} ran-on-the-wrong-route")


@_here.event(routes=_routes)
def link(previous: object, path: str, token: str, pause: float = 0.0) -> str:
    """A workflow step: log ``token``, a nonce and what it was given from its parents, then sleep.

    Returns ``pid:nonce:aN`` (N: the attempt), so what a dependent received can be traced to a real run.
    """
    import json

    from skunkqueue import current_job

    context = current_job()
    # The attempt number travels with the execution: two runs on one attempt show as such.
    execution = f"{os.getpid()}:{os.urandom(6).hex()}:a{context.attempt if context else 0}"
    append_line(path, f"{token} {execution} {json.dumps(previous, separators=(',', ':'))}")
    if pause:
        time.sleep(pause)
    return execution
