"""asyncio: async producers (``afire``, ``aresult``) and ``async def`` jobs run concurrently by a worker."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import skunkqueue.queue
from skunkqueue.errors import JobFailed, JobTimeout
from skunkqueue.persistence import Persistence
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import COMPLETE, ERROR, KILLED, PENDING
from skunkqueue.testing import jobs
from skunkqueue.testing.suite_support import declare, wait_until


def _lines(log: Path, kind: str) -> dict[str, tuple[float, int]]:
    found = {}
    if log.exists():
        for line in log.read_text().splitlines():
            what, job_id, at, pid = line.split()
            if what == kind:
                found[job_id] = (float(at), int(pid))
    return found


def _most_at_once(log: Path) -> int:
    events = sorted([(at, 1) for at, _ in _lines(log, "start").values()]
                    + [(at, -1) for at, _ in _lines(log, "end").values()])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


class AsyncSuite:
    """Mixed into :class:`~skunkqueue.testing.ConformanceSuite`."""

    def test_aget_setting_reads_what_put_setting_stored(self, queue: SkunkQueue) -> None:
        """``afire`` reads the workers' signing policy with it: the same value, on the async side."""
        store = queue.persistence
        if not store.supports_settings:
            pytest.skip(f"the {store.name} backend keeps no settings "
                        "(it does not implement get_setting and put_setting)")
        store.put_setting("kit-setting {}:$.", "value {}:$.")

        async def read() -> tuple[str | None, str | None]:
            backend = await queue.aopen()
            return await backend.aget_setting("kit-setting {}:$."), await backend.aget_setting("kit-absent")

        assert asyncio.run(read()) == ("value {}:$.", None)

    def test_async_producers_fire_and_await(self, queue: SkunkQueue, start_pool: Any) -> None:
        add, fail = declare(queue, jobs.add), declare(queue, jobs.fail)
        start_pool(["r"])

        async def produce() -> None:
            handle = await add.afire(4, 5)
            assert await handle == 9
            later = await add.afire_at(timedelta(seconds=0.3), 1, 2)
            assert await later.aresult(timeout=20) == 3
            many = await add.afire_many([(i, i) for i in range(10)])
            assert await asyncio.gather(*(h.aresult(timeout=20) for h in many)) == [2 * i for i in range(10)]
            with pytest.raises(JobFailed) as info:
                await (await fail.afire("async kaput")).aresult(timeout=20)
            assert info.value.error_type == "ValueError"
            pending = await add.afire_at(timedelta(minutes=5), 1, 1)
            with pytest.raises(JobTimeout):
                await pending.aresult(timeout=0.2)
            assert pending.state == PENDING

        asyncio.run(produce())

    @pytest.mark.serial  # a 250 ms bound on the loop: run alone, not beside other tests' pools
    def test_afire_never_blocks_the_event_loop(self, queue: SkunkQueue, monkeypatch: pytest.MonkeyPatch) -> None:
        add = declare(queue, jobs.add)
        opened_on: list[int] = []
        open_backend = skunkqueue.queue.open_backend

        def opening(*args: Any, **kwargs: Any) -> Persistence:
            opened_on.append(threading.get_ident())
            return open_backend(*args, **kwargs)

        monkeypatch.setattr(skunkqueue.queue, "open_backend", opening)

        async def run() -> tuple[int, float, float]:
            gaps: list[float] = []
            loop_thread = threading.get_ident()

            async def ticker() -> None:
                last = time.monotonic()
                while True:
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            tick = asyncio.create_task(ticker())
            started = time.monotonic()
            handles = [await add.afire(i, 1) for i in range(1000)]
            took = time.monotonic() - started
            tick.cancel()
            assert len({h.id for h in handles}) == 1000
            # Even the first call's connect and ping ran on a thread, not on the loop.
            assert opened_on and loop_thread not in opened_on, "the async connection was opened on the loop"
            return len(gaps), max(gaps), took

        ticks, worst, took = asyncio.run(run())
        # The ticker kept its 10 ms rhythm while the thousand fires were stored.
        assert ticks >= took / 0.01 * 0.5, f"{ticks} ticks in {took:.2f} s"
        assert worst < 0.25, f"the loop was blocked for {worst * 1000:.0f} ms"
        assert queue.counts() == {("r", PENDING): 1000}
        backend = queue.apersistence
        if type(backend).aenqueue is not Persistence.aenqueue:
            # A backend with a native async client served them itself, not the thread of the defaults.
            assert "_async_executor" not in backend.__dict__, f"{backend.name}'s afire went through a thread"

    def test_afire_and_aresult_work_from_several_event_loops(self, queue: SkunkQueue, start_pool: Any) -> None:
        """A queue outlives loops and is shared by threads with loops of their own (each gets its client)."""
        add = declare(queue, jobs.add)
        start_pool(["r"])
        results: dict[int, list[int]] = {}
        errors: list[BaseException] = []

        async def produce(base: int) -> list[int]:
            handles = [await add.afire(base, i) for i in range(20)]
            return list(await asyncio.gather(*(h.aresult(timeout=30) for h in handles)))

        def in_thread(base: int) -> None:
            try:
                results[base] = asyncio.run(produce(base))
            except BaseException as exc:  # the main thread reports it
                errors.append(exc)

        threads = [threading.Thread(target=in_thread, args=(base,)) for base in (100, 200)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        results[300] = asyncio.run(produce(300))
        results[400] = asyncio.run(produce(400))  # a new loop after the last one closed
        assert not errors, errors
        assert results == {base: [base + i for i in range(20)] for base in (100, 200, 300, 400)}

    def test_async_jobs_run_concurrently_each_with_its_own_context(
            self, queue: SkunkQueue, start_pool: Any, tmp_path: Path) -> None:
        log = tmp_path / "runs"
        anap = declare(queue, jobs.anap)
        handles = anap.fire_many([(0.5, str(log))] * 40)
        start_pool(["r"], extra=["--async-concurrency", "20"])
        results = [h.wait(timeout=60) for h in handles]
        assert results == [h.id for h in handles], "a job saw another job's context"
        assert _most_at_once(log) >= 10, "async jobs did not overlap"
        assert len(_lines(log, "start")) == 40 and len({pid for _, pid in _lines(log, "start").values()}) == 1

    def test_timeout_and_kill_stop_only_their_own_async_job(self, queue: SkunkQueue, start_pool: Any,
                                                           tmp_path: Path) -> None:
        log = tmp_path / "runs"
        anap = declare(queue, jobs.anap)
        limited = declare(queue, jobs.anap, timeout=1).fire(30, str(log))
        doomed = anap.fire(30, str(log))
        others = [anap.fire(2.0, str(log)) for _ in range(4)]
        start_pool(["r"], extra=["--async-concurrency", "8"])
        wait_until(lambda: doomed.id in _lines(log, "start"), what="the job to start")
        queue.kill(doomed)
        with pytest.raises(JobFailed) as info:
            limited.wait(timeout=20)
        assert info.value.error_type == "TimeoutError"
        with pytest.raises(JobFailed):
            doomed.wait(timeout=20)
        assert doomed.state == KILLED
        assert [h.wait(timeout=20) for h in others] == [h.id for h in others]

    def test_gentle_stop_finishes_async_jobs_and_rough_stop_kills_them(
            self, queue: SkunkQueue, start_pool: Any, tmp_path: Path) -> None:
        log = tmp_path / "runs"
        anap = declare(queue, jobs.anap)
        gentle = [anap.fire(1.5, str(log)) for _ in range(3)]
        pool = start_pool(["r"], extra=["--async-concurrency", "4"])
        wait_until(lambda: len(_lines(log, "start")) == 3, what="the jobs to start")
        pool.signal(signal.SIGTERM)
        assert pool.wait(30) == 0
        assert [h.state for h in gentle] == [COMPLETE] * 3
        rough = [anap.fire(60, str(log)) for _ in range(3)]
        pool = start_pool(["r"], extra=["--async-concurrency", "4"])
        wait_until(lambda: len(_lines(log, "start")) == 6, what="the jobs to start")
        pool.signal(signal.SIGINT)
        assert pool.wait(30) == 130
        assert [h.state for h in rough] == [KILLED] * 3
        start_pool(["r"], extra=["--async-concurrency", "4"])
        time.sleep(1.0)
        assert [h.state for h in rough] == [KILLED] * 3 and len(_lines(log, "start")) == 6

    def test_a_job_blocking_the_loop_keeps_leases_and_meets_its_time_limit(
            self, queue: SkunkQueue, start_pool: Any, tmp_path: Path) -> None:
        log = tmp_path / "runs"
        anap = declare(queue, jobs.anap)
        neighbours = [anap.fire(0.2, str(log)) for _ in range(3)]
        blocker = anap.fire(0.1, str(log), 4.0)  # blocks the loop 4 s; lease 1.5 s
        start_pool(["r"], lease=1.5, extra=["--async-concurrency", "8"])
        assert blocker.wait(timeout=30) == blocker.id
        assert [h.wait(timeout=30) for h in neighbours] == [h.id for h in neighbours]
        record = queue.get(blocker.id)
        assert record is not None and (record.attempts, record.token) == (1, 1), "a second worker took it"
        # Past its time limit and never yielding: the pool kills the worker.
        stuck = declare(queue, jobs.anap, timeout=1).fire(0.1, str(log), 60.0)
        with pytest.raises(JobFailed) as info:
            stuck.wait(timeout=40)
        assert info.value.error_type == "TimeoutError" and queue.get(stuck.id).state == ERROR  # type: ignore[union-attr]

    def test_sigkilled_async_jobs_are_handed_out_again(self, queue: SkunkQueue, start_pool: Any,
                                                       tmp_path: Path) -> None:
        log = tmp_path / "runs"
        anap = declare(queue, jobs.anap)
        handles = [anap.fire(3.0, str(log)) for _ in range(3)]
        first = start_pool(["r"], lease=1.5, extra=["--async-concurrency", "4"])
        wait_until(lambda: len(_lines(log, "start")) == 3, what="the jobs to start")
        first.signal(signal.SIGKILL)
        first.wait(10)
        start_pool(["r"], lease=1.5, extra=["--async-concurrency", "4"])
        assert [h.wait(timeout=40) for h in handles] == [h.id for h in handles]
        for handle in handles:
            record = queue.get(handle.id)
            assert record is not None and (record.attempts, record.token) == (2, 2)
