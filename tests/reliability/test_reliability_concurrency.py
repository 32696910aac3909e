"""Concurrency without faults: four worker processes on two routes never run a job twice.

Every job writes its execution to a file outside the queue. With no worker
killed and leases far longer than any job, each job must run exactly once and
be charged exactly one attempt (attempts == 1). It may be claimed more than once
only by a hand-back: with ``--prefetch auto`` (the default) a worker that claimed
several jobs hands back, uncharged, one it could not start within a second of its
claim (a loaded machine), and the next claim takes it again (token 2, attempts 1).
CI fires 2,000
jobs (fast enough on every backend); ``make chaos`` (SKUNQ_CHAOS=long) fires 10,000.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import reliability_jobs
from conftest import Figures, PoolStarter, open_queue
from reliability_support import all_records, check_outcomes, executions, wait_all_finished

from skunkqueue import serializer
from skunkqueue.queue import SkunkQueue
from skunkqueue.testing.kit import BackendUnderTest

LONG = os.environ.get("SKUNQ_CHAOS") == "long"
ROUTES = ["a", "b"]


@pytest.mark.parametrize("jobs_total", [
    pytest.param(2_000, id="ci"),
    pytest.param(10_000, id="long", marks=[
        pytest.mark.chaos, pytest.mark.timeout(1200),
        pytest.mark.skipif(not LONG, reason="long concurrency run: make chaos (SKUNQ_CHAOS=long)")]),
])
def test_four_workers_two_routes_no_duplicates(backend: BackendUnderTest, queue_name: str, queue: SkunkQueue,
                                               start_pool: PoolStarter, tmp_path: Path, figures: Figures,
                                               jobs_total: int) -> None:
    log = tmp_path / "executions"
    pool = start_pool(ROUTES, concurrency=2)
    assert len(pool.worker_pids()) == 4
    fired: dict[str, str] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def produce(route: str) -> None:
        # Two producers, one per route, firing while the workers already take jobs.
        try:
            q = open_queue(backend, queue_name)
            mark = q.event(routes=[route])(reliability_jobs.mark.func)
            for start in range(0, jobs_total // 2, 250):
                tokens = [f"{route}-{i}" for i in range(start, min(start + 250, jobs_total // 2))]
                handles = mark.fire_many([(str(log), t) for t in tokens])
                with lock:
                    fired.update({h.id: t for h, t in zip(handles, tokens)})
            q.close()
        except BaseException as exc:
            errors.append(exc)

    began = time.monotonic()
    producers = [threading.Thread(target=produce, args=(route,)) for route in ROUTES]
    for t in producers:
        t.start()
    for t in producers:
        t.join()
    assert not errors, f"a producer failed: {errors[0]!r}"
    wait_all_finished(queue.persistence, jobs_total, timeout=240 if jobs_total <= 2_000 else 1000)
    elapsed = time.monotonic() - began
    records = all_records(queue.persistence, ROUTES)
    runs = executions(log)
    numbers = check_outcomes(records, fired, runs, lambda raw: serializer.loads(raw, "json"))
    assert numbers["duplicates"] == 0, f"{numbers['duplicates']} duplicate executions without any fault"
    charged = [(r.id, r.attempts, r.token) for r in records if r.attempts != 1]
    assert not charged, f"{len(charged)} jobs were charged more than one attempt: {charged[:5]}"
    handed_back = sum(1 for r in records if r.token > 1)  # uncharged hand-backs of prefetched jobs
    pids = {execution.split(":")[0] for runs_of_one in runs.values() for execution in runs_of_one}
    assert len(pids) == 4, f"all four workers should have taken jobs, {len(pids)} did"
    assert sorted(pool.worker_pids()) == sorted(int(p) for p in pids), "a worker was restarted"
    figures.record("concurrency" if jobs_total <= 2_000 else "concurrency-long", fired=numbers["fired"],
                   lost=numbers["lost"], duplicates=numbers["duplicates"], handed_back=handed_back, workers=4,
                   seconds=round(elapsed, 1), jobs_per_second=round(jobs_total / elapsed))
