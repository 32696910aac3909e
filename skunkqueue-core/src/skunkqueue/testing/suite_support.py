"""Helpers the conformance suites share."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from skunkqueue.job import Job, JobHandle
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import JobRecord, new_id


def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def started(marker: Path) -> bool:
    """True once ``jobs.nap`` has written its start line (the file appears a moment earlier)."""
    return marker.exists() and "start" in marker.read_text()


def make_record(queue: str, route: str = "r", *, due: float | None = None, target: str | None = None,
                func: str = "skunkqueue.testing.jobs:add", payload: bytes = b"[[1,2],{}]",
                retries: int = 0, **fields: Any) -> JobRecord:
    """A pending record of the kit's ``add`` job, due now; ``fields`` set any other JobRecord field."""
    now = time.time()
    return JobRecord(id=new_id(), queue=queue, route=route, func=func, payload=payload,
                     due=now if due is None else due, created=now, target=target, retries=retries, **fields)


def status_counts(output: str) -> dict[tuple[str, str], int]:
    """``skunq status``'s table read back as {(route, state): jobs}; a line that is not a row fails the test."""
    lines = output.strip().splitlines()
    assert lines and lines[0].split() == ["route", "state", "jobs"], f"no status table in {output!r}"
    counts = {}
    for line in lines[1:]:
        route, state, jobs = line.rsplit(None, 2)
        assert jobs.isdigit(), f"not a status row: {line!r}"
        counts[(route.strip(), state)] = int(jobs)
    return counts


def declare(queue: SkunkQueue, job: Job, route: str = "r", **options: Any) -> Job:
    """The kit's job ``job`` declared on this test's queue and route."""
    return queue.event(routes=[route], **options)(job.func)


class Producer:
    """The producer API a kit test goes through, so each producer test runs through both.

    ``sync``: ``fire``/``fire_at``/``fire_many`` and ``wait``. ``async``:
    ``afire``/``afire_at``/``afire_many`` and ``aresult``, all on one event
    loop of the test's own (as an application's loop would be), so the
    backend's native async client is made once and reused.
    """

    def __init__(self, api: str) -> None:
        if api not in ("sync", "async"):
            raise ValueError(f"api must be 'sync' or 'async', not {api!r}")
        self.api = api
        self._loop: Any = None
        if api == "async":
            import asyncio

            self._loop = asyncio.new_event_loop()

    def _run(self, awaitable: Any) -> Any:
        return self._loop.run_until_complete(awaitable)

    def fire(self, job: Job, *args: Any, **kwargs: Any) -> JobHandle:
        return job.fire(*args, **kwargs) if self._loop is None else self._run(job.afire(*args, **kwargs))

    def fire_at(self, job: Job, when: Any, *args: Any, **kwargs: Any) -> JobHandle:
        if self._loop is None:
            return job.fire_at(when, *args, **kwargs)
        return self._run(job.afire_at(when, *args, **kwargs))

    def fire_many(self, job: Job, calls: Any, **kwargs: Any) -> list[JobHandle]:
        return job.fire_many(calls, **kwargs) if self._loop is None else self._run(job.afire_many(calls, **kwargs))

    def wait(self, handle: JobHandle, timeout: float | None = None) -> Any:
        return handle.wait(timeout) if self._loop is None else self._run(handle.aresult(timeout))

    def close(self) -> None:
        if self._loop is not None:
            # As asyncio.run ends a loop: async generators first (native clients close there).
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()
