"""Chaos: producers keep firing while worker processes are SIGKILLed about every second.

Afterwards every fired job has exactly one record, in ``complete``, whose
recorded result is one of the executions the job logged to a file outside the
queue; none is lost. Jobs executed more than once (at-least-once delivery
after a kill) are counted and reported, not forbidden.

One of the pools runs with its host clock 60 s ahead (``skunkqueue.testing.clocks``;
a pool killed is replaced by one with the same clock), and under ``make chaos`` a
third runs 60 s behind. Every eighth batch is fired 1.5 s ahead, one job at a
time, and its starts are logged by the true clock: none may start before it was
due. On the FoundationDB stand-in, which times leases with hosts' clocks, a pool
off by more than the lease allows (here 1 s) refuses to start by design, so the
skew there is 0.5 s, and since due times there are hosts' clocks too, a delayed
job may start as early as that pool's clock is ahead (and no earlier). SQLite is
one host's file, whose processes share one clock, so it runs without skew.

The CI run fires ~300 jobs in ~10 s; ``make chaos`` (SKUNQ_CHAOS=long) fires 2000.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import reliability_jobs
from conftest import Figures, open_queue, pool_starter
from reliability_support import all_records, check_outcomes, executions, live_worker_pids, wait_all_finished

from skunkqueue import serializer
from skunkqueue.testing.clocks import skewed
from skunkqueue.testing.kit import BackendUnderTest
from skunkqueue.testing.workers import PoolProcess

LONG = os.environ.get("SKUNQ_CHAOS") == "long"
LEASE = 1.5         # short, so a killed worker's job is handed out again quickly
JOB_PAUSE = 0.05    # each job sleeps after its side effect: kills land mid-job
ROUTES = ["a", "b"]
DELAY = 1.5         # every DELAYED-th batch is fired this far ahead
DELAYED = 8


def clock_skews(backend: BackendUnderTest, long: bool) -> list[float]:
    """The pools' clock offsets (seconds): a normal one first, then the skewed ones."""
    if backend.name == "sqlite":
        return [0.0, 0.0]  # one host, one clock: a skewed process would be a second host
    if backend.name == "fdb":
        # Leases timed in hosts' clocks: a pool further off than lease - renewal (1 s) refuses to start.
        return [0.0, 0.5, -0.5] if long else [0.0, 0.5]
    return [0.0, 60.0, -60.0] if long else [0.0, 60.0]


def _produce(backend: BackendUnderTest, queue_name: str, log: Path, producer: int, count: int,
             spread: float, fired: dict[str, str], lock: threading.Lock, errors: list[BaseException],
             dues: dict[str, float]) -> None:
    """Fire ``count`` jobs in small batches, alternating routes, over ``spread`` seconds; every
    DELAYED-th batch one by one, DELAY seconds ahead, each due time noted in ``dues``."""
    try:
        q = open_queue(backend, queue_name)  # each producer has its own connection
        jobs = [q.event(routes=[route])(reliability_jobs.mark.func) for route in ROUTES]
        stamps = str(log.with_name("starts"))
        batch = 5
        batches = max(1, count // batch)
        started = time.monotonic()
        for b in range(batches):
            n = batch if b < batches - 1 else count - batch * (batches - 1)
            tokens = [f"p{producer}-{b}-{i}" for i in range(n)]
            if b % DELAYED == DELAYED - 1:
                handles = []
                for t in tokens:
                    # Noted before the call: the store's due counts from a later now.
                    due = time.time() + DELAY
                    handles.append(jobs[b % 2].fire_at(timedelta(seconds=DELAY), str(log), t, JOB_PAUSE, stamps))
                    with lock:
                        dues[t] = due
            else:
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
    dues: dict[str, float] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []
    worker_kills = pool_kills = 0
    rng = random.Random(1234)
    skews = clock_skews(backend, jobs_total > 300)
    clock_of: dict[int, float] = {}  # id(pool) -> its clock's offset, kept by its replacement

    def start_with(skew: float, ready: bool = True) -> PoolProcess:
        on = skewed(backend, skew, tmp_path / f"skew{skew:+g}") if skew else backend
        pool = start(ROUTES, lease=LEASE, on=on, ready=ready)
        clock_of[id(pool)] = skew
        return pool

    try:
        live = [start_with(skew) for skew in skews]
        producers = [threading.Thread(target=_produce, args=(backend, queue_name, log, p, jobs_total // 2,
                                                             seconds * 0.8, fired, lock, errors, dues))
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
                live.append(start_with(clock_of[id(victim)], ready=False))
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
        # Nothing before its time, whichever pool's clock ran it. On FoundationDB, whose due times are
        # hosts' clocks too, a pool ahead may start a job as early as its clock is ahead, and no earlier.
        starts = [line.split() for line in log.with_name("starts").read_text().splitlines()]
        ahead = max(skews) if backend.name == "fdb" else 0.0
        leads = [dues[token] - float(t) for token, t in starts]
        early = [f"{token} started {dues[token] - float(t):.3f} s early" for token, t in starts
                 if float(t) < dues[token] - ahead - 0.05]
        assert len({token for token, _ in starts}) == len(dues) > 0, "the delayed jobs did not all run"
        assert not early, early[:5]
        assert len(records) == jobs_total, "the store holds records nobody fired"
        q.close()
    finally:
        for pool in pools:
            pool.stop()
    name = "chaos" if jobs_total <= 300 else "chaos-long"
    figures.record(name, fired=numbers["fired"], lost=numbers["lost"], duplicates=numbers["duplicates"],
                   jobs_run_more_than_once=numbers["jobs_run_more_than_once"],
                   worker_kills=worker_kills + pool_kills, pool_kills=pool_kills,
                   seconds=round(time.monotonic() - began, 1), delayed=len(dues), early=len(early),
                   start_minus_due_min=round(-max(leads), 3),
                   clocks=" ".join(f"{skew:+g}" for skew in skews))
    assert worker_kills + pool_kills >= seconds * 0.8, "the chaos loop did not kill as often as intended"
