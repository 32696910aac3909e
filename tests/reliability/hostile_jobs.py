"""Jobs that behave as badly as a user's code can: hold the GIL, swallow every
exception, exit the process, return what cannot be encoded.

Workers get this directory with ``--path`` and ``--import hostile_jobs``.
Each job first appends one line to a file outside the queue, so the tests
count starts independently of what the queue recorded.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import sys
import time
from typing import Any

from skunkqueue.testing.kit import append_line, kit_queue, kit_routes

# Declared on the test's queue and routes inside a test's pool (see reliability_jobs.py).
_here = kit_queue("skunkqueue-hostile")
_routes = kit_routes(["a"])

# Calls through PyDLL keep the GIL: a libc sleep through it is a C call that
# holds the GIL for as long as we ask, as a long regex or a C extension would.
_gil_holding_libc = ctypes.PyDLL(None)


@_here.event(routes=_routes)
def hold_gil(path: str, token: str, seconds: float) -> str:
    """Hold the GIL for ``seconds`` in one C call (no thread of this process runs meanwhile)."""
    append_line(path, f"{token} {os.getpid()}")
    _gil_holding_libc.usleep(int(seconds * 1_000_000))  # a signal may end it early: that is fine
    return "held"


@_here.event(routes=_routes)
def unresponsive(path: str, token: str, seconds: float) -> str:
    """Block every signal that can be blocked, then hold the GIL: nothing can interrupt it."""
    append_line(path, f"{token} {os.getpid()}")
    signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})
    _gil_holding_libc.usleep(int(seconds * 1_000_000))  # one C call: no bytecode, no handler runs
    return "unstoppable"


@_here.event(routes=_routes)
def catastrophic_regex(path: str, token: str, length: int = 32) -> bool:
    """Exponential backtracking inside the re module: seconds to minutes in C, GIL held."""
    append_line(path, f"{token} {os.getpid()}")
    return re.match(r"(a+)+$", "a" * length + "b") is not None


@_here.event(routes=_routes)
def swallow_everything(path: str, token: str, seconds: float = 120.0) -> str:
    """Run for ``seconds``, catching every interruption (BaseException) thrown at it."""
    append_line(path, f"{token} {os.getpid()}")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            time.sleep(0.05)
        except BaseException:
            append_line(path, f"{token}-swallowed {os.getpid()}")
    return "survived"


@_here.event(routes=_routes)
def exit_process(path: str, token: str, code: int = 0) -> None:
    append_line(path, f"{token} {os.getpid()}")
    sys.exit(code)


@_here.event(routes=_routes)
def interrupt_keyboard(path: str, token: str) -> None:
    append_line(path, f"{token} {os.getpid()}")
    raise KeyboardInterrupt("from the job")


@_here.event(routes=_routes)
def deep_result(path: str, token: str, depth: int = 5000) -> Any:
    append_line(path, f"{token} {os.getpid()}")
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


@_here.event(routes=_routes)
def pid(path: str, token: str) -> int:
    append_line(path, f"{token} {os.getpid()}")
    return os.getpid()


@_here.event(routes=_routes)
def context_log(path: str, fail_first: int = 0, pause: float = 0.0) -> int:
    """Append this attempt's ``current_job()`` as JSON; fail the first ``fail_first`` attempts."""
    import dataclasses
    import json

    import skunkqueue

    ctx = skunkqueue.current_job()
    assert ctx is not None
    append_line(path, json.dumps({**dataclasses.asdict(ctx), "pid": os.getpid()}))
    if pause:
        time.sleep(pause)
    if ctx.attempt <= fail_first:
        raise ValueError(f"attempt {ctx.attempt} fails on purpose")
    return ctx.token


@_here.event(routes=_routes)
def stall_first_start(path: str, seconds: float) -> int:
    """Append this attempt's ``current_job()`` as JSON; the first start recorded in ``path`` then stalls.

    Later starts (counted in the file, not by the queue) return at once, with the attempt number.
    """
    import dataclasses
    import json

    import skunkqueue

    ctx = skunkqueue.current_job()
    assert ctx is not None
    append_line(path, json.dumps({**dataclasses.asdict(ctx), "pid": os.getpid()}))
    with open(path) as fh:
        if len(fh.read().splitlines()) == 1:
            time.sleep(seconds)
    return ctx.attempt


@_here.event(routes=_routes)
def fenced_write(log: str, db_path: str, invoice: str, pause: float) -> int:
    """Log the context, stall, then write through examples/fencing.py's token guard."""
    import sqlite3

    import fencing  # examples/ is on the worker's --path

    import skunkqueue

    ctx = skunkqueue.current_job()
    assert ctx is not None
    append_line(log, f"{ctx.token} {os.getpid()}")
    time.sleep(pause)
    with sqlite3.connect(db_path) as db:
        fencing.guarded_write(db, invoice, f"attempt {ctx.attempt}", ctx.token)
    return ctx.token


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("this exception cannot print itself")


@_here.event(routes=_routes)
def broken_str(path: str, token: str) -> None:
    append_line(path, f"{token} {os.getpid()}")
    raise _Unprintable()


@_here.event(routes=_routes)
def reset_signal(path: str, token: str, signame: str, to: str, pause: float = 0.0) -> str:
    """Set ``signame`` to SIG_DFL or SIG_IGN (``to``), then sleep ``pause`` (C-level sleeps, GIL released)."""
    append_line(path, f"{token} {os.getpid()}")
    signal.signal(getattr(signal, signame), getattr(signal, to))
    end = time.monotonic() + pause
    while time.monotonic() < end:
        time.sleep(0.05)
    return "reset"


@_here.event(routes=_routes)
def fork_and_return(path: str, token: str) -> int:
    """Fork; both processes return (the child must not go on as a worker)."""
    append_line(path, f"{token} {os.getpid()}")
    os.fork()
    return os.getpid()


@_here.event(routes=_routes)
def timed(path: str, token: str, seconds: float) -> str:
    """Log start and end (also when interrupted) with times, to check that runs never overlap."""
    append_line(path, f"{token}-start {time.time()!r}:{os.getpid()}")
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.02)
    finally:
        append_line(path, f"{token}-end {time.time()!r}:{os.getpid()}")
    return "done"
