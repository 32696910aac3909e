"""Chaos: producers keep firing while worker processes are SIGKILLed about every second.

Afterwards every fired job has exactly one record, in ``complete``, whose
recorded result is one of the executions the job logged to a file outside the
queue; none is lost. Jobs executed more than once (at-least-once delivery
after a kill) are counted and reported, not forbidden.

The CI run fires ~300 jobs in ~10 s; ``make chaos`` (SKUNQ_CHAOS=long) fires 2000.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
import reliability_jobs
from conftest import Figures, open_queue, pool_starter
from reliability_support import all_records, check_outcomes, executions, live_worker_pids, wait_all_finished

from skunkqueue import serializer
from skunkqueue.testing.kit import BackendUnderTest

LONG = os.environ.get("SKUNQ_CHAOS") == "long"
LEASE = 1.5         # short, so a killed worker's job is handed out again quickly
JOB_PAUSE = 0.05    # each job sleeps after its side effect: kills land mid-job
ROUTES = ["a", "b"]


def _produce(backend: BackendUnderTest, queue_name: str, log: Path, producer: int, count: int,
             spread: float, fired: dict[str, str], lock: threading.Lock, errors: list[BaseException]) -> None:
    """Fire ``count`` jobs in small batches, alternating routes, over ``spread`` seconds."""
    try:
        q = open_queue(backend, queue_name)  # each producer has its own connection
        jobs = [q.event(routes=[route])(reliability_jobs.mark.func) for route in ROUTES]
        batch = 5
        batches = max(1, count // batch)
        started = time.monotonic()
        for b in range(batches):
            n = batch if b < batches - 1 else count - batch * (batches - 1)
            tokens = [f"p{producer}-{b}-{i}" for i in range(n)]
            handles = jobs[b % 2].fire_many([(str(log), t, JOB_PAUSE) for t in tokens])
            with lock:
                fired.update({h.id: t for h, t in zip(handles, tokens)})
            lag = started + spread * (b + 1) / batches - time.monotonic()
            if lag > 0:
                time.sleep(lag)
        q.close()
    except BaseException as exc:  # reported by the test thread
        errors.append(exc)


@pytest.mark.parametrize("jobs_total, seconds", [
    pytest.param(300, 8, id="ci"),
    pytest.param(2000, 40, id="long", marks=[
        pytest.mark.chaos, pytest.mark.timeout(900),
        pytest.mark.skipif(not LONG, reason="long chaos run: make chaos (SKUNQ_CHAOS=long)")]),
])
def test_sigkilled_workers_lose_no_job(backend: BackendUnderTest, queue_name: str, tmp_path: Path,
                                       figures: Figures, jobs_total: int, seconds: float) -> None:
    start, pools = pool_starter(backend, queue_name, tmp_path)
    log = tmp_path / "executions"
    fired: dict[str, str] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []
    worker_kills = pool_kills = 0
    rng = random.Random(1234)
    try:
        live = [start(ROUTES, lease=LEASE), start(ROUTES, lease=LEASE)]
        producers = [threading.Thread(target=_produce, args=(backend, queue_name, log, p, jobs_total // 2,
                                                             seconds * 0.8, fired, lock, errors))
                     for p in range(2)]
        for t in producers:
            t.start()
        began = time.monotonic()
        tick = 0
        # Until the time is up, the producers are done and the kills are as many as intended: on a
        # loaded machine (tests in parallel) a restarting pool can leave a tick with no worker to kill.
        while (time.monotonic() - began < seconds or any(t.is_alive() for t in producers)
               or (worker_kills + pool_kills < seconds * 0.8 and time.monotonic() - began < seconds * 6)):
            time.sleep(1.0)
            tick += 1
            if tick % 4 == 0:
                # The whole pool: its workers die with it (PR_SET_PDEATHSIG); start a new one.
                victim = live.pop(rng.randrange(len(live)))
                victim.process.send_signal(signal.SIGKILL)
                victim.process.wait(10)
                pool_kills += 1
                live.append(start(ROUTES, lease=LEASE, ready=False))
            else:
                # One worker: its pool notices and starts a replacement.
                pids = [pid for pool in live for pid in live_worker_pids(pool)]
                if pids:
                    os.kill(rng.choice(pids), signal.SIGKILL)
                    worker_kills += 1
        for t in producers:
            t.join()
        assert not errors, f"a producer failed: {errors[0]!r}"
        assert len(fired) == jobs_total
        q = open_queue(backend, queue_name)
        wait_all_finished(q.persistence, jobs_total, timeout=120 + seconds)
        records = all_records(q.persistence, ROUTES)
        runs = executions(log)
        numbers = check_outcomes(records, fired, runs, lambda raw: serializer.loads(raw, "json"))
        by_id = {r.id: r for r in records}
        # No execution without a claim: a job never ran more often than it was handed out.
        over = [job_id for job_id, token in fired.items() if len(runs[token]) > by_id[job_id].attempts]
        assert not over, f"jobs executed more often than claimed: {over[:5]}"
        assert len(records) == jobs_total, "the store holds records nobody fired"
        q.close()
    finally:
        for pool in pools:
            pool.stop()
    name = "chaos" if jobs_total <= 300 else "chaos-long"
    figures.record(name, fired=numbers["fired"], lost=numbers["lost"], duplicates=numbers["duplicates"],
                   jobs_run_more_than_once=numbers["jobs_run_more_than_once"],
                   worker_kills=worker_kills + pool_kills, pool_kills=pool_kills,
                   seconds=round(time.monotonic() - began, 1))
    assert worker_kills + pool_kills >= seconds * 0.8, "the chaos loop did not kill as often as intended"
