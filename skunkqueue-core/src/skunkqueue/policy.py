"""What happens to a job after an attempt: complete, retry later, or dead-letter.

Kept in the core so that every backend follows the same rules; backends only
apply the :class:`~skunkqueue.record.Outcome` decided here.
"""

from __future__ import annotations

import random
import time

from skunkqueue.record import (
    COMPLETE,
    ERROR,
    KILLED,
    MIN_ATTEMPTS_ON_LOST_LEASE,
    PENDING,
    JobRecord,
    Outcome,
)


def backoff_delay(record: JobRecord) -> float:
    """Exponential back-off with jitter: base * 2**(attempt-1), scaled by 0.5-1.0."""
    delay = record.retry_backoff * (2 ** max(0, record.attempts - 1))
    return delay * (0.5 + random.random() / 2)


def completed(result: bytes) -> Outcome:
    return Outcome(COMPLETE, result=result)


def failed(record: JobRecord, error: dict[str, str], *, retryable: bool = True) -> Outcome:
    """A failed attempt: retry after a back-off while attempts remain, else dead-letter."""
    if retryable and record.attempts <= record.retries:
        return Outcome(PENDING, error=error, due=time.time() + backoff_delay(record))
    return Outcome(ERROR, error=error, dead=True)


def killed(reason: str) -> Outcome:
    return Outcome(KILLED, error={"type": "JobKilled", "message": reason, "traceback": ""})


def lease_lost(record: JobRecord) -> Outcome:
    """The worker holding the job vanished. A lost lease counts as an attempt.

    Even a job with ``retries=0`` is handed out again, up to
    MIN_ATTEMPTS_ON_LOST_LEASE starts, so a crashed worker never loses work.
    """
    limit = max(record.retries + 1, MIN_ATTEMPTS_ON_LOST_LEASE)
    error = {
        "type": "LeaseLost",
        "message": f"worker {record.owner} stopped renewing its lease (attempt {record.attempts})",
        "traceback": "",
    }
    if record.attempts < limit:
        return Outcome(PENDING, error=error, due=time.time())
    error["message"] += f"; gave up after {record.attempts} attempts"
    return Outcome(ERROR, error=error, dead=True)


def release(record: JobRecord) -> Outcome:
    """Hand back a prefetched job that was never started (the worker is stopping)."""
    return Outcome(PENDING, due=record.due, attempts=max(0, record.attempts - 1), error=record.error)


def requeue(record: JobRecord) -> Outcome:
    """Put a finished (dead-lettered, failed or killed) job back with fresh attempts."""
    return Outcome(PENDING, due=time.time(), attempts=0)
