"""Jobs that write their starts and ends into a :mod:`history` file; pools import this module.

Workers get this directory with ``--path`` and ``--import history_jobs``. The
jobs are declared on the pool's queue and routes (``kit_queue``/``kit_routes``).
A pool whose environment sets ``SKUNQ_HISTORY`` and ``SKUNQ_HISTORY_EVERY``
(seconds) also runs the periodic ``tick``, which writes its slot into that history.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

from history import append_event, slot_token

from skunkqueue.context import current_job
from skunkqueue.testing.clocks import true_time
from skunkqueue.testing.kit import kit_queue, kit_routes

_here = kit_queue("skunkqueue-history")
_routes = kit_routes(["h"])


def _attempt(history: str, op: str, token: str, **extra: Any) -> None:
    # Stamped with the host's true time: in a pool whose clock is skewed (testing.clocks) time.time()
    # is off, and the checker compares these stamps with the producers' and with due times set by
    # the store's clock, so a skewed stamp would read as an early (or late) start that never happened.
    ctx = current_job()
    assert ctx is not None, "a history job runs inside a worker"
    fields: dict[str, Any] = {"id": ctx.id, "token": token, "attempt": ctx.attempt, "fence": ctx.token,
                              "pid": os.getpid(), "t": true_time(), **extra}
    if op == "start" and ctx.dependencies:
        fields["parents"] = sorted(ctx.dependencies)
    append_event(history, op, **fields)


@_here.event(routes=_routes)
def step(history: str, token: str, pause: float = 0.0) -> str:
    """Write ``start``, sleep ``pause`` in small steps, write ``end``.

    An interruption (lease lost, kill: a ``BaseException`` raised in the job) still
    writes ``end``, with the exception's name as ``outcome``: the attempt stopped
    there, and the checker must not take it for one still running.
    """
    _attempt(history, "start", token)
    outcome = "ok"
    try:
        deadline = time.monotonic() + pause
        while time.monotonic() < deadline:
            time.sleep(min(0.05, max(deadline - time.monotonic(), 0.0)))
    except BaseException as exc:
        outcome = type(exc).__name__
        raise
    finally:
        # A worker raises its interrupt (lease lost, kill) into the job from a signal handler, so it
        # can land here too, before the line is written; the attempt then looked open for good to the
        # checker (a false "concurrent" with the retry). A worker raises one interrupt per attempt.
        try:
            _attempt(history, "end", token, outcome=outcome)
        except BaseException as exc:
            _attempt(history, "end", token, outcome=type(exc).__name__)
            raise
    return token


if os.environ.get("SKUNQ_HISTORY") and os.environ.get("SKUNQ_HISTORY_EVERY"):
    _every = float(os.environ["SKUNQ_HISTORY_EVERY"])

    # catch_up: every slot missed while the store was away fires, so a skipped slot is a fault.
    @_here.periodic(every=timedelta(seconds=_every), routes=_routes, misfire_grace=30, catch_up=True)
    def tick() -> None:
        ctx = current_job()
        assert ctx is not None and ctx.slot is not None
        slot = ctx.slot.timestamp()
        token = slot_token("tick", slot)
        _attempt(os.environ["SKUNQ_HISTORY"], "start", token, due=slot)
        _attempt(os.environ["SKUNQ_HISTORY"], "end", token)
