"""The handles ``fire`` returns, and what they (and jobs, workflows and schedules) use of their queue.

:class:`QueueLike` names what those use of the :class:`~skunkqueue.queue.SkunkQueue`
that made them. The queue stands above them all (it makes jobs, fires workflows
and declares schedules), so they know it by this protocol, not by its class.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol, Sequence

from skunkqueue import serializer
from skunkqueue.errors import ConfigurationError, JobFailed, JobTimeout
from skunkqueue.persistence import Persistence
from skunkqueue.record import COMPLETE, ERROR, FINISHED_STATES, KILLED, PENDING, RUNNING, JobRecord, WorkerInfo


class QueueLike(Protocol):
    """What jobs, handles, workflows and schedules use of their queue (a ``SkunkQueue``).

    A job is passed where a method takes one (``Any`` here: the job model stands on this module).
    """

    @property
    def name(self) -> str: ...

    @property
    def queue_type(self) -> str: ...

    @property
    def serializer(self) -> str: ...

    @property
    def result_ttl(self) -> float: ...

    @property
    def persistence(self) -> Persistence: ...

    async def aopen(self) -> Persistence: ...

    def get(self, job_id: str) -> JobRecord | None: ...

    def kill(self, job_or_id: Any) -> str | None: ...

    def _enqueue(self, job: Any, calls: list[tuple[tuple[Any, ...], dict[str, Any]]], due: float,
                 keys: list[str | None] | None = None, using: Any = None,
                 after: Sequence[Any] | None = None, on_failure: str | None = None,
                 priority: int | None = None) -> list[JobHandle]: ...

    async def _aenqueue(self, job: Any, calls: list[tuple[tuple[Any, ...], dict[str, Any]]], due: float,
                        keys: list[str | None] | None = None, after: Sequence[Any] | None = None,
                        on_failure: str | None = None, priority: int | None = None) -> list[JobHandle]: ...

    def _records(self, backend: Persistence, job: Any, calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
                 due: float, keys: list[str | None] | None, live: list[WorkerInfo] | None,
                 routes: Sequence[str] | None = None) -> list[list[JobRecord]]: ...

    def _sending(self, backend: Persistence, records: list[JobRecord]) -> AbstractContextManager[None]: ...


def due_time(when: timedelta | datetime | float | int) -> float:
    """Epoch seconds for ``fire_at``'s ``when``: a delay or an aware datetime.

    A negative delay is refused (it is almost always a bug). A datetime in the
    past is due now: it runs after the jobs already due, never ahead of them,
    so a producer cannot jump the queue by naming an old time.
    """
    now = time.time()
    if isinstance(when, timedelta):
        if when < timedelta(0):
            raise ConfigurationError(
                f"fire_at got a negative delay ({when.total_seconds():g} s); use fire() to run now."
            )
        return now + when.total_seconds()
    if isinstance(when, datetime):
        if when.tzinfo is None:
            raise ConfigurationError(
                "fire_at needs an aware datetime (e.g. datetime.now(timezone.utc) + ...) "
                "or a timedelta; a naive datetime has no unambiguous time."
            )
        return max(now, when.astimezone(timezone.utc).timestamp())
    raise ConfigurationError(f"fire_at takes a timedelta or an aware datetime, not {type(when).__name__}.")



def check_finished(job_id: str, record: JobRecord | None, timeout: float | None) -> None:
    """Raise as ``wait`` does unless ``record`` completed."""
    if record is None:
        raise JobFailed(f"Job {job_id} no longer exists (expired or purged).", job_id=job_id, state=ERROR)
    if record.state not in FINISHED_STATES:
        raise JobTimeout(f"Job {job_id} is still {record.state} after {timeout} s.")
    if record.state != COMPLETE:
        err = record.error or {}
        raise JobFailed(
            f"Job {job_id} ({record.func}) ended {record.state}: "
            f"{err.get('type', '')}: {err.get('message', '')}".rstrip(": "),
            job_id=job_id, state=record.state, error_type=err.get("type"),
            remote_traceback=err.get("traceback"),
        )


class JobHandle:
    """What ``fire`` returns: one firing, delivered to one record per route (or worker)."""

    def __init__(self, queue: QueueLike, records: Sequence[JobRecord], serializer: str | None = None) -> None:
        self.queue = queue
        self.ids = [r.id for r in records]
        self.routes = [r.route for r in records]
        # What ``result`` is keyed by when there are several deliveries.
        self.keys = [r.target or r.route for r in records]
        # Records read back from the store (queue.handle) must not choose their decoder: see _value.
        self._serializer = serializer or (records[0].serializer if records else "json")

    def __repr__(self) -> str:
        return f"<JobHandle {self.id} {self.state}>"

    @property
    def id(self) -> str:
        """The id of the (first) delivery; ``ids`` has one per route."""
        return self.ids[0] if self.ids else ""

    def records(self) -> list[JobRecord | None]:
        return [self.queue.get(job_id) for job_id in self.ids]

    @property
    def state(self) -> str:
        """``pending``, ``running``, ``complete``, ``error`` or ``killed``.

        For a firing with several deliveries: the least advanced one, and once
        all are finished, ``error`` if any failed, ``killed`` if any was killed.
        """
        states = [r.state if r else ERROR for r in self.records()]
        for state in (RUNNING, PENDING):
            if state in states:
                return RUNNING if RUNNING in states else PENDING
        for state in (ERROR, KILLED):
            if state in states:
                return state
        return COMPLETE

    def _value(self, record: JobRecord | None) -> Any:
        if record is None or record.state != COMPLETE or record.result is None:
            return None
        # Decode with the serializer this queue fired with, never the one the
        # stored record claims: a record rewritten to say "pickle" must not
        # make the producer unpickle (run) whatever its result holds.
        return serializer.loads(record.result, self._serializer, what="result")

    @property
    def result(self) -> Any:
        """The return value once complete, else None.

        With several deliveries: ``{route: value}``, or ``{worker_id: value}``
        on a broadcast queue.
        """
        return self._result_of(self.records())

    def _result_of(self, records: Sequence[JobRecord | None]) -> Any:
        if len(records) == 1:
            return self._value(records[0])
        return {key: self._value(r) for key, r in zip(self.keys, records)}

    @property
    def error(self) -> dict[str, str] | None:
        """``{"type", "message", "traceback"}`` of the (first) failed delivery."""
        for record in self.records():
            if record is not None and record.error and record.state in (ERROR, KILLED):
                return record.error
        return None

    def wait(self, timeout: float | None = None) -> Any:
        """Block until every delivery has finished; return ``result``.

        Raises JobTimeout if ``timeout`` passes first and JobFailed (with the
        remote traceback) if a delivery ended in ``error`` or ``killed``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        backend = self.queue.persistence
        records: list[JobRecord | None] = []
        for job_id in self.ids:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            record = backend.wait_finished(job_id, left)
            check_finished(job_id, record, timeout)
            records.append(record)
        # The finished records already hold the results: no second read.
        return self._result_of(records)

    async def aresult(self, timeout: float | None = None) -> Any:
        """``wait`` for asyncio code: waits on the store without blocking the event loop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        backend = await self.queue.aopen()
        records: list[JobRecord | None] = []
        for job_id in self.ids:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            record = await backend.await_finished(job_id, left)
            check_finished(job_id, record, timeout)
            records.append(record)
        return self._result_of(records)

    def __await__(self) -> Any:
        return self.aresult().__await__()

    def kill(self) -> None:
        """Kill every delivery of this firing (see ``SkunkQueue.kill``)."""
        for job_id in self.ids:
            self.queue.kill(job_id)
