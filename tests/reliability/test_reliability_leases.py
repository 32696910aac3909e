"""Leases and fencing end to end, with real worker processes and real signals.

* A worker paused (SIGSTOP) past its lease, then resumed (SIGCONT), cannot
  overwrite the outcome recorded by the worker that took the job over.
* A lost lease counts as an attempt: it uses up one of the job's retries.
* A poison job that kills every worker that runs it is dead-lettered after
  MIN_ATTEMPTS_ON_LOST_LEASE starts, while the other jobs all complete.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import reliability_jobs
from conftest import Figures, PoolStarter
from reliability_support import executions, live_worker_pids, wait_until

from skunkqueue.errors import JobFailed
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import COMPLETE, ERROR, MIN_ATTEMPTS_ON_LOST_LEASE
from skunkqueue.testing.workers import pid_alive

LEASE = 1.5


def test_paused_worker_cannot_overwrite_the_takeover(queue: SkunkQueue, start_pool: PoolStarter,
                                                     tmp_path: Path, figures: Figures) -> None:
    log = tmp_path / "executions"
    first = start_pool(["a"], lease=LEASE)
    [paused] = first.worker_pids()
    mark = queue.event(routes=["a"])(reliability_jobs.mark.func)
    handle = mark.fire(str(log), "t", 3.0)
    wait_until(lambda: executions(log).get("t"), what="the first worker to start the job")
    os.kill(paused, signal.SIGSTOP)
    try:
        second = start_pool(["a"], lease=LEASE)
        [taker] = second.worker_pids()
        result = handle.wait(timeout=40)
        assert result.startswith(f"{taker}:"), "the job was completed by the worker that took it over"
        recorded = queue.get(handle.id)
        assert recorded is not None and (recorded.state, recorded.attempts, recorded.token) == (COMPLETE, 2, 2)
    finally:
        os.kill(paused, signal.SIGCONT)
    # The paused worker resumes with its job's sleep long over and tries to
    # record its own outcome; the fencing token refuses it.
    wait_until(lambda: "lease lost" in first.log(), timeout=20, what="the resumed worker to notice")
    time.sleep(1.0)
    after = queue.get(handle.id)
    assert after is not None and after.to_dict() == recorded.to_dict(), "the stale worker overwrote the outcome"
    runs = executions(log)["t"]
    assert [r.split(":")[0] for r in runs] == [str(paused), str(taker)]
    # The resumed worker is healthy: it was neither restarted nor wedged.
    assert pid_alive(paused) and first.worker_pids() == [paused]
    more = [mark.fire(str(log), f"after-{i}") for i in range(6)]
    assert all(h.wait(timeout=30) for h in more)
    figures.record("paused-worker", fired=7, lost=0, duplicates=len(runs) - 1, worker_pauses=1,
                   stale_writes_refused=1)


def test_a_lost_lease_counts_as_an_attempt(queue: SkunkQueue, start_pool: PoolStarter, tmp_path: Path,
                                           figures: Figures) -> None:
    log = tmp_path / "starts"
    pool = start_pool(["a"], lease=LEASE)
    job = queue.event(routes=["a"], retries=1, retry_backoff=0.1)(reliability_jobs.hang_first_then_fail.func)
    handle = job.fire(str(log))
    wait_until(log.exists, what="the first start")
    [worker] = pool.worker_pids()
    os.kill(worker, signal.SIGKILL)  # attempt 1: lease lost
    with pytest.raises(JobFailed) as info:
        handle.wait(timeout=40)      # attempt 2: fails, and no retry is left
    assert info.value.error_type == "ValueError" and "failed on start 2" in str(info.value)
    record = queue.get(handle.id)
    assert record is not None and (record.state, record.attempts, record.dead) == (ERROR, 2, True)
    time.sleep(1.0)
    assert log.read_text().count("start") == 2, "the job ran again although its retries were used up"
    figures.record("lost-lease-attempt", fired=1, lost=0, duplicates=0, worker_kills=1)


def test_poison_job_is_dead_lettered_and_other_jobs_complete(queue: SkunkQueue, start_pool: PoolStarter,
                                                             tmp_path: Path, figures: Figures) -> None:
    starts, log = tmp_path / "poison", tmp_path / "executions"
    pool = start_pool(["a"], concurrency=2, lease=0.5)
    poison = queue.event(routes=["a"])(reliability_jobs.kill_own_worker.func).fire(str(starts))
    mark = queue.event(routes=["a"])(reliability_jobs.mark.func)
    others = [mark.fire(str(log), f"ok-{i}", 0.05) for i in range(30)]
    with pytest.raises(JobFailed) as info:
        poison.wait(timeout=90)
    # Its pool sees each worker die and records the attempt at once (no lease to wait out).
    assert info.value.error_type == "WorkerDied"
    assert f"gave up after {MIN_ATTEMPTS_ON_LOST_LEASE} attempts" in str(info.value)
    assert starts.read_text().count("start") == MIN_ATTEMPTS_ON_LOST_LEASE
    assert all(h.wait(timeout=60) for h in others)
    runs = executions(log)
    assert sorted(runs) == sorted(f"ok-{i}" for i in range(30))
    # The pool replaced every worker the poison job took down.
    wait_until(lambda: len(live_worker_pids(pool)) == 2, timeout=30, what="the pool to restart its workers")
    figures.record("poison-job", fired=31, lost=0, duplicates=sum(len(v) - 1 for v in runs.values()),
                   worker_kills=MIN_ATTEMPTS_ON_LOST_LEASE)
