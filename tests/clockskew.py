"""Clock-skew checks shared by the Redis and MongoDB tests (skunkqueue-redis/tests, skunkqueue-mongo/tests).

A store with a clock decides what is due and when a lease ran out, so a host
whose clock is off must neither run a delayed job early nor take over a lease
that is being renewed. The skew is simulated per process: ``skewed``
(from :mod:`skunkqueue.testing.clocks`) puts a ``sitecustomize.py`` that
shifts ``time.time`` on a pool's PYTHONPATH.
"""

from __future__ import annotations

import contextlib
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Iterator

import pytest

from skunkqueue import housekeeping, policy
from skunkqueue.persistence import LEASE_OK, Persistence
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import COMPLETE, PENDING, JobRecord, Outcome, WorkerInfo, new_id
from skunkqueue.testing import BackendUnderTest, jobs
from skunkqueue.testing.clocks import skewed
from skunkqueue.testing.workers import PoolProcess

SKEWS = [60.0, -60.0]


@contextlib.contextmanager
def local_clock_off_by(seconds: float) -> Iterator[None]:
    """This process's time.time() runs ``seconds`` off while inside."""
    real = time.time
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(time, "time", lambda: real() + seconds)
        yield


def first_log_time(log: str) -> float:
    """The time of the first line of a pool's log ("2026-11-28 08:53:40,223 INFO ...")."""
    stamp = " ".join(log.split()[:2]).replace(",", ".")
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()


def _record(queue: str, due: float) -> JobRecord:
    return JobRecord(id=new_id(), queue=queue, route="r", func="skunkqueue.testing.jobs:add",
                     payload=b"[[1,2],{}]", due=due, created=time.time())


# -- the protocol, called from a process whose clock is off ----------------------------------


def check_protocol_uses_the_store_clock(store: Persistence, skew: float) -> None:
    store_now = store.now()
    assert abs(store_now - time.time()) < 1, "the store and this host should agree before the test skews"
    later = _record(store.queue, time.time() + 30)
    store.enqueue([_record(store.queue, time.time() - 1)])
    store.enqueue([later])
    with local_clock_off_by(skew):
        # Running (lease 30 s by the store's clock), and not taken over by a fast clock's housekeeping.
        [running] = store.claim("r", "w", 30, limit=5)
        assert running.lease_until is not None and abs(running.lease_until - (store_now + 30)) < 2
        assert running.started is not None and abs(running.started - store_now) < 2
        assert store.expired_leases(time.time()) == []
        assert housekeeping.recover_expired_leases(store) == 0
        assert store.renew("w", [(running.id, running.token)], 30) == {running.id: LEASE_OK}
        # Due in 30 s by the store's clock: not claimable, whatever this host thinks.
        assert store.claim("r", "w", 30) == []
        # A delay asked for by a skewed producer counts from the store's now.
        delayed = _record(store.queue, time.time() + 45)
        store.enqueue([delayed])
        stored = store.get(delayed.id)
        assert stored is not None and abs(stored.due - (store_now + 45)) < 2, stored.due - store_now
        # So does a retry's back-off, and finish stamps the store's time.
        assert store.finish(running.id, running.token, Outcome(PENDING, due=time.time() + 20))
        back = store.get(running.id)
        assert back is not None and abs(back.due - (store_now + 20)) < 2
        assert store.claim("r", "w", 30) == []
    [again] = [r for r in store.list_jobs(state=PENDING) if r.id == running.id]
    assert again.due > time.time() + 15
    kept = store.get(later.id)
    assert kept is not None and kept.due == later.due  # written within the tolerance: kept exactly
    with local_clock_off_by(skew):
        done = _record(store.queue, time.time() - 5)
        store.enqueue([done])
        [claimed] = store.claim("r", "w", 30)
        assert claimed.id == done.id
        assert store.finish(claimed.id, claimed.token, policy.completed(b"1"))
        final = store.get(done.id)
        assert final is not None and final.finished is not None and abs(final.finished - store.now()) < 2
        # A skewed worker's registration and heartbeats are on the store's clock, so it is not reaped.
        # (explicit stamps: WorkerInfo's default_factory holds the unpatched time.time)
        store.register_worker(WorkerInfo(id="skewed", queue=store.queue, route="r", host="h", pid=1,
                                         started=time.time(), last_seen=time.time()))
        [seen] = store.workers()
        assert abs(seen.last_seen - store_now) < 5 and abs(seen.started - store_now) < 5
        assert store.heartbeat("skewed", "busy")
    assert housekeeping.reap_dead_workers(store) == []
    [beat] = store.workers()
    assert beat.state == "busy" and abs(beat.last_seen - store.now()) < 2
    # A job handed back unstarted (a stopping worker's held job) keeps the due it had: that time was
    # read from the record, on the store's clock, so moving it by this host's skew would put a
    # periodic slot's job a minute off its slot (CI, issue 28) or behind jobs fired after it.
    held = _record(store.queue, time.time() - 5)
    store.enqueue([held])
    stored = store.get(held.id)
    assert stored is not None
    with local_clock_off_by(skew):
        [claimed] = store.claim("r", "w", 30)
        assert claimed.id == held.id
        assert store.finish(claimed.id, claimed.token, policy.release(claimed))
    back = store.get(held.id)
    assert back is not None and back.state == PENDING
    assert back.due == stored.due, f"handed back {back.due - stored.due:+.3f} s off its due"


# -- real worker processes whose clocks are off ---------------------------------------------


def check_skewed_worker_steals_no_live_lease(backend: BackendUnderTest, queue_name: str, skew: float,
                                             tmp_path: Path) -> None:
    """A normal pool runs a job past several lease lengths while a skewed pool idles on the route."""
    marker = tmp_path / "starts"
    queue = SkunkQueue(queue_name, backend=backend.name, conn_url=backend.url, dbname=backend.db,
                       **backend.options)
    nap = queue.event(routes=["r"])(jobs.nap.func)
    pools = [PoolProcess(backend, queue_name, ["r"], lease=2.0, log_path=tmp_path / "normal.log")]
    try:
        pools[0].wait_ready()
        handle = nap.fire(6, str(marker))
        deadline = time.monotonic() + 20
        while "start" not in (marker.read_text() if marker.exists() else ""):
            assert time.monotonic() < deadline, pools[0].log()
            time.sleep(0.05)
        pools.append(PoolProcess(skewed(backend, skew, tmp_path / "skew"), queue_name, ["r"], lease=2.0,
                                 log_path=tmp_path / "skewed.log"))
        pools[1].wait_ready()
        # The skewed pool is really skewed: its log lines carry its own clock.
        assert abs(first_log_time(pools[1].log_head()) - time.time() - skew) < 10, pools[1].log_head()
        assert len(queue.workers()) == 2, "a skewed worker is not reaped as dead"
        assert handle.wait(timeout=30) == "rested"
        record = queue.get(handle.id)
        assert record is not None and (record.state, record.attempts, record.token) == (COMPLETE, 1, 1)
        assert marker.read_text().count("start") == 1, marker.read_text()
        assert "lost its lease" not in pools[1].log() + pools[0].log()
    finally:
        for pool in pools:
            pool.stop()
        queue.close()


def check_skewed_worker_runs_delayed_job_on_time(backend: BackendUnderTest, queue_name: str, skew: float,
                                                 tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    queue = SkunkQueue(queue_name, backend=backend.name, conn_url=backend.url, dbname=backend.db,
                       **backend.options)
    mark = queue.event(routes=["r"])(jobs.mark.func)
    pool = PoolProcess(skewed(backend, skew, tmp_path / "skew"), queue_name, ["r"], log_path=tmp_path / "pool.log")
    try:
        pool.wait_ready()
        fired = time.monotonic()
        handle = mark.fire_at(timedelta(seconds=3), str(ran), "x")
        while not ran.exists():
            assert time.monotonic() - fired < 12, f"the delayed job did not run: {pool.log()}"
            time.sleep(0.02)
        waited = time.monotonic() - fired
        print(f"\n{backend.name}, worker clock {skew:+.0f} s: a job delayed 3 s ran after {waited:.2f} s")
        assert waited > 2.8, f"ran {3 - waited:.1f} s early"
        assert isinstance(handle.wait(timeout=10), int)
        assert ran.read_text().splitlines() == ["x"]
    finally:
        pool.stop()
        queue.close()
