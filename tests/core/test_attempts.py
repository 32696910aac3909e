"""One attempt, the same way on both workers: the sync :class:`Worker` and the :class:`AsyncWorker`.

Each test runs a real worker in this process (``--burst``: it stops once its
route is drained) against a SQLite store, with the pool's end of the real
pipes, and holds the hooks it saw and the events the pool heard against what
the attempt pipeline promises. The job that is interrupted sends the pool's
command down the pipe and runs what the worker's SIGUSR1 handler runs.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from skunkqueue import SkunkQueue, channel, hookimpl
from skunkqueue.async_worker import AsyncWorker
from skunkqueue.errors import PayloadTooLarge
from skunkqueue.hooks import plugin_manager
from skunkqueue.persistence.sqlite import SQLitePersistence
from skunkqueue.record import COMPLETE, ERROR, KILLED, PENDING, JobRecord, Outcome, WorkerInfo
from skunkqueue.worker import EXIT_DRAINED, Worker, WorkerConfig

KINDS = ("sync", "async")
ASYNC_TWINS = {"aadd", "aboom", "astopped", "abig"}
_running: list[tuple[Worker, channel.PoolEnd]] = []  # the worker a job may interrupt, and its pool end


def _interrupt_me(reason: channel.Reason) -> None:
    """What the pool does to the running job: the command down the pipe, then the signal's handler."""
    worker, pool = _running[-1]
    job_id = worker.current.id if worker.current is not None else next(iter(worker._tasks))  # type: ignore[attr-defined]
    assert pool.send(channel.Interrupt(job_id, reason))
    worker._read_commands()  # what SIGUSR1's handler runs


def add(first: int, second: int) -> int:
    return first + second


async def aadd(first: int, second: int) -> int:
    await asyncio.sleep(0)
    return first + second


def boom(message: str) -> None:
    raise ValueError(message)


async def aboom(message: str) -> None:
    await asyncio.sleep(0)
    raise ValueError(message)


def stopped(reason: str) -> str:
    _interrupt_me(channel.Reason(reason))
    time.sleep(5)  # never reached: the interrupt raises into the job
    return "finished anyway"


async def astopped(reason: str) -> str:
    _interrupt_me(channel.Reason(reason))
    await asyncio.sleep(5)  # cancelled at this await
    return "finished anyway"


def big(size: int) -> str:
    return "x" * size


async def abig(size: int) -> str:
    return "x" * size


def count_me(token: Any) -> str:
    return "ran"


class Counted:
    """An argument whose unpickling appends a line to a file: counts how often a record is decoded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _decoded, (self.path,)


def _decoded(path: str) -> str:
    with open(path, "a") as fh:
        fh.write("decoded\n")
    return path


class Seen:
    """A plugin that writes down every hook a worker fires."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    @hookimpl
    def worker_started(self, worker: WorkerInfo) -> None:
        self.calls.append(("worker_started", worker.route))

    @hookimpl
    def worker_stopped(self, worker: WorkerInfo) -> None:
        self.calls.append(("worker_stopped", worker.route))

    @hookimpl
    def job_started(self, record: JobRecord) -> None:
        self.calls.append(("job_started", _short(record)))

    @hookimpl
    def job_finished(self, record: JobRecord, outcome: Outcome) -> None:
        self.calls.append(("job_finished", f"{_short(record)} {outcome.state}"))

    @hookimpl
    def job_failed(self, record: JobRecord, error: dict[str, str]) -> None:
        self.calls.append(("job_failed", f"{_short(record)} {error.get('type')}"))

    @hookimpl
    def job_lost(self, record: JobRecord) -> None:
        self.calls.append(("job_lost", _short(record)))

    def jobs(self) -> list[tuple[str, str]]:
        return [call for call in self.calls if call[0].startswith("job_")]


def _short(record: JobRecord) -> str:
    name = record.func.rsplit(":", 1)[-1]
    return name[1:] if name in ASYNC_TWINS else name  # an async twin reads as its sync job


@pytest.fixture
def seen() -> Iterator[Seen]:
    plugin = Seen()
    plugin_manager().register(plugin)
    try:
        yield plugin
    finally:
        plugin_manager().unregister(plugin)


class RefusingStore(SQLitePersistence):
    """SQLite with a limit on what ``finish`` stores, as a server with a document limit has:
    the worker only learns of it when the store refuses the outcome."""

    limit = 1000

    def _finish(self, conn: Any, job_id: str, token: int, outcome: Outcome, expect: str) -> bool:
        if outcome.result is not None and len(outcome.result) > self.limit:
            raise PayloadTooLarge(f"the store keeps results up to {self.limit} bytes")
        return super()._finish(conn, job_id, token, outcome, expect)


class Bench:
    """One queue, one route, and a worker of either kind to drain it."""

    def __init__(self, tmp_path: Path, kind: str) -> None:
        self.kind, self.db = kind, str(tmp_path / "q.db")
        self.queue = SkunkQueue("attempts", conn_url=self.db, retries=0)
        self.pickled = SkunkQueue("attempts", conn_url=self.db, retries=0, serializer="pickle")
        self.store: type[SQLitePersistence] = SQLitePersistence
        self.events: list[channel.Event] = []
        self.allow_pickle = True
        self.jobs: list[Any] = []

    def job(self, sync_func: Any, async_func: Any = None, *, pickled: bool = False, **options: Any) -> Any:
        func = async_func if self.kind == "async" and async_func is not None else sync_func
        job = (self.pickled if pickled else self.queue).event(routes=["r"], **options)(func)
        self.jobs.append(job)  # declarations are weak: the worker runs only what someone holds
        return job

    def drain(self) -> int:
        pool = channel.PoolEnd()
        events_fd, control_fd, _ = pool.child_fds()
        config = WorkerConfig(queue="attempts", route="r", url=self.db, burst=True, allow_pickle=self.allow_pickle,
                              async_concurrency=2 if self.kind == "async" else 1,
                              events_fd=events_fd, control_fd=control_fd)
        worker = AsyncWorker(config) if self.kind == "async" else Worker(config)
        store = self.store
        config.open = lambda: store("attempts", url=self.db)  # type: ignore[method-assign]
        _running.append((worker, pool))
        try:
            code = worker.run()
        finally:
            _running.pop()
            self.events += pool.events()
            pool.close()
        return code

    def done(self) -> list[str]:
        """The outcomes the pool heard, in order."""
        return [event.state for event in self.events if isinstance(event, channel.Done)]


@pytest.fixture(params=KINDS)
def bench(request: pytest.FixtureRequest, tmp_path: Path) -> Bench:
    return Bench(tmp_path, request.param)


def test_a_completed_job_fires_started_and_finished(bench: Bench, seen: Seen) -> None:
    handle = bench.job(add, aadd).fire(2, 3)
    assert bench.drain() == EXIT_DRAINED
    assert (handle.state, handle.result) == (COMPLETE, 5)
    assert seen.calls == [("worker_started", "r"), ("job_started", "add"), ("job_finished", "add complete"),
                          ("worker_stopped", "r")]
    assert bench.done() == [COMPLETE]


def test_a_failed_job_fires_finished_then_failed(bench: Bench, seen: Seen) -> None:
    handle = bench.job(boom, aboom).fire("no")
    bench.drain()
    assert handle.state == ERROR
    assert seen.jobs() == [("job_started", "boom"), ("job_finished", "boom error"), ("job_failed", "boom ValueError")]
    assert bench.done() == [ERROR]


def test_a_job_that_will_retry_fires_failed_too(bench: Bench, seen: Seen) -> None:
    handle = bench.job(boom, aboom, retries=1, retry_backoff=60).fire("again")
    bench.drain()
    assert handle.state == PENDING
    assert seen.jobs() == [("job_started", "boom"), ("job_finished", "boom pending"),
                           ("job_failed", "boom ValueError")]


def test_a_kill_ends_the_job_killed_without_failed(bench: Bench, seen: Seen) -> None:
    handle = bench.job(stopped, astopped).fire("kill")
    bench.drain()
    assert handle.state == KILLED
    assert seen.jobs() == [("job_started", "stopped"), ("job_finished", "stopped killed")]
    assert bench.done() == [KILLED]


def test_a_time_limit_fails_the_attempt(bench: Bench, seen: Seen) -> None:
    handle = bench.job(stopped, astopped).fire("time")
    bench.drain()
    record = bench.queue.get(handle.id)
    assert record is not None and record.state == ERROR and record.error is not None
    assert record.error["type"] == "TimeoutError"
    assert seen.jobs() == [("job_started", "stopped"), ("job_finished", "stopped error"),
                           ("job_failed", "stopped TimeoutError")]


def test_a_lost_lease_records_nothing_and_fires_lost(bench: Bench, seen: Seen) -> None:
    handle = bench.job(stopped, astopped).fire("lost")
    bench.drain()
    record = bench.queue.get(handle.id)
    assert record is not None and record.state == "running"  # another worker's now; this one wrote nothing
    assert seen.jobs() == [("job_started", "stopped"), ("job_lost", "stopped")]
    assert bench.done() == ["lost"]


def test_an_outcome_the_store_refuses_is_recorded_as_that_refusal(bench: Bench, seen: Seen) -> None:
    bench.store = RefusingStore
    handle = bench.job(big, abig).fire(5000)
    bench.drain()
    record = bench.queue.get(handle.id)
    assert record is not None and record.state == ERROR and record.error is not None
    assert (record.error["type"], record.dead) == ("PayloadTooLarge", True)
    assert seen.jobs() == [("job_started", "big"), ("job_finished", "big error"),
                           ("job_failed", "big PayloadTooLarge")]
    assert bench.done() == [ERROR]


def test_a_job_that_cannot_be_prepared_fails_without_starting(bench: Bench, seen: Seen) -> None:
    # A pickled record reaching a worker that does not unpickle: refused before any of its code runs.
    handle = bench.job(add, aadd, pickled=True).fire(1, 2)
    bench.allow_pickle = False
    bench.drain()
    record = bench.queue.get(handle.id)
    assert record is not None and record.state == ERROR and record.error is not None
    assert record.error["type"] == "SerializationError"
    assert seen.jobs() == [("job_finished", "add error"), ("job_failed", "add SerializationError")]
    assert bench.done() == [ERROR]


def test_each_record_is_decoded_once(bench: Bench, seen: Seen, tmp_path: Path) -> None:
    # A sync job reaching an async worker ran its whole preparation twice: two decodes,
    # two signature checks, two reads of a workflow step's parents.
    marks = tmp_path / "decoded.txt"
    handle = bench.job(count_me, pickled=True).fire(Counted(str(marks)))  # a sync job on either worker
    bench.drain()
    assert handle.state == COMPLETE
    assert marks.read_text().splitlines() == ["decoded"]
    assert seen.jobs() == [("job_started", "count_me"), ("job_finished", "count_me complete")]
