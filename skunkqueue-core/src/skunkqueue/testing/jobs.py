"""Job functions the conformance kit fires; worker processes import them from here.

The kit re-declares each function on its own per-test queue in the test
process. Its pools start with ``--import skunkqueue.testing.jobs`` and with
the test's queue and routes in ``SKUNQ_KIT_QUEUE``/``SKUNQ_KIT_ROUTES``, so in
the worker the Jobs below are declared on exactly that queue and those routes
(outside a kit pool: queue ``skunkqueue-testing``, route ``kit``). A worker
still refuses a record of any other queue or route.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from skunkqueue.context import current_job
from skunkqueue.testing.clocks import true_time
from skunkqueue.testing.kit import append_line, kit_queue, kit_routes

_kit = kit_queue("skunkqueue-testing")
_routes = kit_routes(["kit"])


@_kit.event(routes=_routes)
def add(first: int, second: int) -> int:
    return first + second


@_kit.event(routes=_routes)
def fail(message: str) -> None:
    raise ValueError(message)


@_kit.event(routes=_routes)
def flaky(path: str, failures: int) -> int:
    """Append a line to ``path`` (counts attempts outside the queue); raise while it has at most ``failures``."""
    append_line(path, f"attempt {os.getpid()}")
    with open(path) as fh:
        attempts = sum(1 for _ in fh)
    if attempts <= failures:
        raise ValueError(f"failure {attempts} of {failures}")
    return attempts


@_kit.event(routes=_routes)
def nap(seconds: float, marker: str | None = None) -> str:
    """Sleep; with ``marker``, append a line to that file first (counts starts)."""
    if marker:
        with open(marker, "a") as fh:
            fh.write(f"start {os.getpid()}\n")
    time.sleep(seconds)
    return "rested"


@_kit.event(routes=_routes)
def mark(path: str, token: str) -> int:
    """Append ``token`` to ``path``: the side effect the kit counts executions by."""
    with open(path, "a") as fh:
        fh.write(token + "\n")
    return os.getpid()


@_kit.event(routes=_routes)
def whoami() -> int:
    return os.getpid()


@_kit.event(routes=_routes)
def unserializable() -> Any:
    return object()


@_kit.event(routes=_routes)
async def anap(seconds: float, log: str | None = None, block: float = 0.0) -> str:
    """An async job: log start and end times around an awaited sleep; ``block`` first blocks the loop."""
    import asyncio  # here: a worker process that runs no async job never loads asyncio

    ctx = current_job()
    me = ctx.id if ctx is not None else "?"
    if log:
        append_line(log, f"start {me} {time.time()!r} {os.getpid()}")
    if block:
        time.sleep(block)  # holds the event loop, as a careless async job does
    await asyncio.sleep(seconds)
    if log:
        append_line(log, f"end {me} {time.time()!r} {os.getpid()}")
    ctx_after = current_job()
    return ctx_after.id if ctx_after is not None else "?"


# -- workflow steps (suite_workflows) ----------------------------------------------------


@_kit.event(routes=_routes)
def step(previous: Any, path: str, token: str, seconds: float = 0.0) -> str:
    """A workflow step: append ``token`` to ``path`` (executions are counted there), nap, return it."""
    append_line(path, token)
    if seconds:
        time.sleep(seconds)
    return token


@_kit.event(routes=_routes)
def total(values: Any, extra: int = 0) -> int:
    """The sum of the numbers in a (nested) list of results, plus ``extra``."""
    if isinstance(values, list):
        return sum(total.func(v) for v in values) + extra
    return int(values) + extra


@_kit.event(routes=_routes)
def gather(results: list[Any], path: str) -> list[Any]:
    """A chord's callback: append one line (counted by the kit) and return the results it got."""
    append_line(path, f"callback {len(results)}")
    return results


@_kit.event(routes=_routes)
def report(path: str) -> dict[str, str]:
    """Append and return how each parent ended (``current_job().dependencies``)."""
    ctx = current_job()
    found = dict(ctx.dependencies or {}) if ctx is not None else {}
    append_line(path, json.dumps(found, sort_keys=True))
    return found


# -- flow control (suite_flow) ------------------------------------------------------------


@_kit.event(routes=_routes)
def stamp(path: str, tenant: str, name: str, seconds: float = 0.0) -> str:
    """Append ``start``/``end`` lines (name, time, pid) around a nap; the end even when interrupted.

    ``tenant`` is there for a limit's key function to read; it is not written (it may hold anything).
    """
    # The host's true time, also in a pool whose clock a test skewed: stamps compare on one clock.
    append_line(path, f"start {name} {true_time()!r} {os.getpid()}")
    try:
        if seconds:
            time.sleep(seconds)
    finally:
        append_line(path, f"end {name} {true_time()!r} {os.getpid()}")
    return name


@_kit.event(routes=_routes)
def stamped_step(previous: Any, path: str, tenant: str, name: str, seconds: float = 0.0) -> str:
    """:func:`stamp` as a workflow step (its first argument is what the step before returned)."""
    return stamp.func(path, tenant, name, seconds)
