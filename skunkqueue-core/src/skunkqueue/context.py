"""What a running job knows about itself: ``skunkqueue.current_job()``.

The worker sets the context around each call of a job's function, in a
context variable, so an async job sees its own context and not a neighbour's.

The fencing token is what makes side effects effectively-once: every claim
of a job bumps it, so a job that writes elsewhere can refuse a write from an
older attempt (one whose worker lost its lease but still runs)::

    ctx = skunkqueue.current_job()
    db.execute("UPDATE invoices SET sent = 1, token = :token "
               "WHERE id = :id AND token < :token", {"id": invoice, "token": ctx.token})

See ``examples/fencing.py``.
"""

from __future__ import annotations

import json
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping

from skunkqueue.record import JobRecord


@dataclass(frozen=True)
class JobContext:
    id: str
    queue: str
    route: str
    function: str          # "module:qualname"
    attempt: int           # 1 for the first start, 2 for the first retry or restart...
    attempts_allowed: int  # retries + 1
    token: int             # the fencing token of this attempt: higher than every earlier attempt's
    lease_until: float | None      # epoch seconds, as claimed; the pool renews it while the job runs
    deadline: float | None         # epoch seconds when the time limit interrupts the job, or None
    key: str | None                # the idempotency key it was fired with, if any
    slot: datetime | None = None   # a periodic job's slot, an aware datetime in UTC
    # A workflow step or fire(after=...): each parent's id and how it ended ("complete", "error",
    # "killed"); with on_failure="run", the parents that did not complete are the ones that failed.
    dependencies: Mapping[str, str] | None = None

    @classmethod
    def of(cls, record: JobRecord, started: float,
           dependencies: Mapping[str, str] | None = None) -> JobContext:
        key = user_key(record.key)
        return cls(id=record.id, queue=record.queue, route=record.route, function=record.func,
                   attempt=record.attempts, attempts_allowed=record.retries + 1, token=record.token,
                   lease_until=record.lease_until,
                   deadline=started + record.timeout if record.timeout else None,
                   key=key, slot=slot_moment(key, record.func), dependencies=dependencies)


def user_key(stored: str | None) -> str | None:
    """The key a producer gave, from the per-route key stored on the record."""
    if stored is None:
        return None
    try:
        route_and_key = json.loads(stored)
        return str(route_and_key[1])
    except (ValueError, TypeError, IndexError, KeyError):
        return stored


_current: ContextVar[JobContext | None] = ContextVar("skunkqueue_current_job", default=None)


def current_job() -> JobContext | None:
    """The context of the job running in this thread (or task); None outside a job."""
    return _current.get()


def slot_moment(key: str | None, function: str) -> datetime | None:
    """The slot a periodic job's key (``FUNCTION@ISO-TIME``, made by :mod:`skunkqueue.periodic`) names,
    exactly, as an aware datetime in UTC (None for any other key)."""
    if not key or not key.startswith(function + "@"):
        return None
    try:
        moment = datetime.fromisoformat(key[len(function) + 1:])
    except ValueError:
        return None
    return None if moment.tzinfo is None else moment.astimezone(timezone.utc)
