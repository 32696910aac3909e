"""What happens to a job after an attempt: complete, retry later, or dead-letter.

Kept in the core so that every backend follows the same rules; backends only
apply the :class:`~skunkqueue.record.Outcome` decided here.
"""

from __future__ import annotations

import random
import time

from skunkqueue.errors import JobKilled, LeaseLost, TimeLimit
from skunkqueue.record import (
    COMPLETE,
    ERROR,
    KILLED,
    LOST,
    MIN_ATTEMPTS_ON_LOST_LEASE,
    PENDING,
    JobRecord,
    Outcome,
)

# The longest wait before a retry: past it, exponential back-off stops growing (2**1024 is no
# float at all: the 1025th attempt of a job with retries=2000 raised OverflowError in the worker).
MAX_RETRY_DELAY = 30 * 24 * 3600.0


def backoff_delay(record: JobRecord) -> float:
    """Exponential back-off with jitter: base * 2**(attempt-1), at most MAX_RETRY_DELAY, scaled by 0.5-1.0."""
    doublings = min(max(0, record.attempts - 1), 64)  # 2**64 s is far past the cap
    delay = min(record.retry_backoff * 2.0 ** doublings, MAX_RETRY_DELAY)
    return delay * (0.5 + random.random() / 2)


def completed(result: bytes) -> Outcome:
    return Outcome(COMPLETE, result=result)


def failed(record: JobRecord, error: dict[str, str], *, retryable: bool = True) -> Outcome:
    """A failed attempt: retry after a back-off while attempts remain, else dead-letter."""
    if retryable and record.attempts <= record.retries:
        return Outcome(PENDING, error=error, due=time.time() + backoff_delay(record))
    return Outcome(ERROR, error=error, dead=True)


def quarantined(why: str) -> Outcome:
    """A stored record that does not decode: dead-lettered with a MalformedRecord error, never retried.

    Backends keep the damaged data for inspection and take it out of every
    route; this is what they record about it (the Redis scripts spell the same
    error in common.lua, since a script cannot call Python).
    """
    return Outcome(ERROR, error={"type": "MalformedRecord", "message": why, "traceback": ""}, dead=True)


def killed(reason: str) -> Outcome:
    return Outcome(KILLED, error={"type": "JobKilled", "message": reason, "traceback": ""})


def interrupted(record: JobRecord, why: JobKilled) -> Outcome | None:
    """The outcome of an attempt that was interrupted; None: record nothing.

    A kill request or a rough stop ends the job ``killed``; a time limit is a
    failed attempt (retried as configured); after a lost lease the job belongs
    to another worker, so nothing is recorded.
    """
    if isinstance(why, LeaseLost):
        return None
    if isinstance(why, TimeLimit):
        return failed(record, {"type": "TimeoutError", "message": why.reason, "traceback": ""})
    return killed(why.reason)


def lease_lost(record: JobRecord) -> Outcome:
    """The worker holding the job vanished. A lost lease counts as an attempt.

    Even a job with ``retries=0`` is handed out again, up to
    MIN_ATTEMPTS_ON_LOST_LEASE starts, so a crashed worker never loses work.
    """
    return worker_died(record, "LeaseLost", f"worker {record.owner} stopped renewing its lease")


def worker_died(record: JobRecord, kind: str, message: str) -> Outcome:
    """The process running the job is gone (crashed, or stopped renewing its lease).

    Counts as an attempt, which the job's history shows as ``lost``; handed out
    again up to MIN_ATTEMPTS_ON_LOST_LEASE starts even with ``retries=0``, then
    dead-lettered.
    """
    limit = max(record.retries + 1, MIN_ATTEMPTS_ON_LOST_LEASE)
    error = {"type": kind, "message": f"{message} (attempt {record.attempts})", "traceback": ""}
    if record.attempts < limit:
        return Outcome(PENDING, error=error, due=time.time()).ending(record, LOST)
    error["message"] += f"; gave up after {record.attempts} attempts"
    return Outcome(ERROR, error=error, dead=True).ending(record, LOST)


def release(record: JobRecord) -> Outcome:
    """Hand back a prefetched job that was never started (the worker is stopping).

    Due as it was (the store's own time, not moved by the caller's clock): a periodic slot's job
    stays due at its slot, and the job keeps its place ahead of those fired after it.
    """
    return Outcome(PENDING, due=record.due, attempts=max(0, record.attempts - 1), error=record.error,
                   due_from_store=True)


def requeue(record: JobRecord) -> Outcome:
    """Put a finished (dead-lettered, failed or killed) job back with fresh attempts."""
    return Outcome(PENDING, due=time.time(), attempts=0)
