"""PostgreSQL promotion under load: a streaming replica promoted after its primary is SIGKILLed.

A primary and one replica (``pg_basebackup -R``, streaming, ``tests/postgres_servers.py``),
clients on ``postgresql://primary,replica/postgres?target_session_attrs=read-write``
(libpq tries each host and keeps the one that accepts writes). Two producers and a
``skunq work`` pool write every fire, start and end into a history outside the queue.
The primary is SIGKILLed, the replica promoted (``pg_ctl promote``), and the same
producers and pool carry on.

- asynchronous replication (PostgreSQL's default): a commit is acknowledged before the
  replica has it, so what the primary acknowledged in its last moments can be lost;
  nothing acknowledged after the promotion may be, and nothing may run twice at once;
- ``synchronous_standby_names`` naming the replica (``synchronous_commit=on``, the
  default): acknowledged only once the replica flushed it, so nothing is lost.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import postgres_servers as servers
import pytest
from failover_load import Load

from skunkqueue.testing.kit import BackendUnderTest
from skunkqueue.testing.suite_support import make_record

pytestmark = pytest.mark.skipif(not servers.available(), reason="PostgreSQL is not installed (scripts/ensure-servers)")

SYNC = {"synchronous_standby_names": "replica1"}
# Short leases: a claim the old primary made and replicated, whose reply never reached the
# worker, leaves a job running on the new primary until its lease runs out.
LEASE = 4.0


@pytest.fixture(params=["async", "sync"])
def replicated_cluster(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any, Any]]:
    mode = request.param
    primary = servers.PostgresServer(settings=dict(SYNC) if mode == "sync" else {}).start()
    replica = servers.PostgresReplica(primary=primary).start()
    try:
        deadline = time.monotonic() + 60
        while not replica.streaming():
            assert time.monotonic() < deadline, replica.log()
            time.sleep(0.1)
        yield mode, primary, replica
    finally:
        replica.destroy()
        primary.destroy()


def both(primary: Any, replica: Any) -> str:
    return (f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{replica.port}/postgres"
            "?target_session_attrs=read-write")


def walsender(primary: Any) -> int:
    """The primary's WAL sender process (a child of its postmaster; other clusters run on this machine)."""
    import subprocess

    out = subprocess.run(["pgrep", "-P", str(primary.postmaster_pid()), "-f", "walsender"],
                         capture_output=True, text=True).stdout.split()
    assert out, "the primary has no walsender"
    return int(out[0])


LONG = os.environ.get("SKUNQ_CHAOS") == "long"


# CI runs the lagging case (the one where the settings differ); make chaos adds the caught-up one.
@pytest.mark.parametrize("lag", [
    pytest.param(False, id="caught-up", marks=[pytest.mark.chaos, pytest.mark.skipif(
        not LONG, reason="caught-up replica: make chaos (SKUNQ_CHAOS=long)")]),
    pytest.param(True, id="lagging"),
])
def test_a_promotion_under_load(replicated_cluster: tuple[str, Any, Any], tmp_path: Path, lag: bool) -> None:
    """``lagging``: the primary's WAL sender is SIGSTOPped for 2 s before the primary dies.

    (Stopping the replica's receiver instead is no lag: the WAL waits in its socket's buffer.)
    """
    mode, primary, replica = replicated_cluster
    queue = f"promo-{mode}"
    load = Load(BackendUnderTest(name="postgres", url=both(primary, replica), db="promotion"), queue, tmp_path,
                pause=0.01, every=0.005, lease=LEASE)
    pool = load.start_pool(concurrency=2)
    try:
        pool.wait_ready(60)
        load.start_producers()
        load.wait_acked(200, what="before the SIGKILL")
        if lag:
            os.kill(walsender(primary), signal.SIGSTOP)  # the replica falls behind; asynchronous commits go on
            time.sleep(2)
        primary.kill()  # the postmaster and its children, at once: no shutdown checkpoint, no last WAL sent
        killed_at = time.monotonic()
        replica.promote()
        promoted_at = time.monotonic()
        load.wait_acked(200, promoted_at, what="after the promotion")
        load.stop_producers()
        load.drain(timeout=90, since=killed_at)
        try:
            # Claimed on the old primary, never answered: runs again once its lease is over.
            load.drain(timeout=LEASE * 4 + 10)
        except AssertionError:
            if mode == "sync":
                raise
            # Asynchronous: some acknowledged jobs may be gone with the old primary (counted below).
        assert pool.process.poll() is None, pool.log()
    finally:
        load.close()
    report = load.report()
    before = {tok for s in load.stats.values() for tok, t in s.acked if t <= killed_at}
    lost = [v.split()[0] for v in report.violations.get("lost", [])]
    state = "lagging" if lag else "caught up"
    print(f"\npostgres promotion ({mode}, {state}): {report.summary()}; {len(before)} fired before the SIGKILL, "
          f"promoted {promoted_at - killed_at:.1f} s after it")
    # Lost (acknowledged, never run) only from the old primary's last moments, and only when asynchronous.
    assert all(token in before for token in lost), lost[:5]
    # Asynchronous replication also rolls the fencing tokens back: a job claimed and run on the old
    # primary is pending on the new one with its older token, and its next claim hands out the
    # same token again ("same-fence"). Nothing ran twice at once here (the jobs are short), but a
    # worker still running such an attempt could finish it over the new one's.
    allowed = {"lost", "same-fence"} if mode == "async" else set()
    others = {kind: items for kind, items in report.violations.items() if kind not in allowed}
    assert not any(others.values()), report.explain()
    if mode == "sync":
        assert report.ok, report.explain()
    elif lag:
        # Two seconds of acknowledged fires never reached the replica: gone with the old primary.
        assert lost, "a lagging asynchronous replica lost nothing: the test did not make it lag"
    assert not load.unexpected_errors(), load.unexpected_errors()[:5]


@pytest.mark.slow  # starts its servers itself: conftest's marking sees no server fixture
def test_what_synchronous_replication_costs_a_producer(tmp_path: Path) -> None:
    """Not a benchmark: the order of magnitude, printed, on this (shared, loaded) machine."""
    from skunkqueue_postgres.persistence import PostgresPersistence

    rates = {}
    for mode in ("async", "sync"):
        primary = servers.PostgresServer(settings=dict(SYNC) if mode == "sync" else {}).start()
        replica = servers.PostgresReplica(primary=primary).start()
        try:
            while not replica.streaming():
                time.sleep(0.1)
            with PostgresPersistence("cost", url=primary.url, db="cost") as store:
                store.enqueue([make_record("cost")])
                started, n = time.perf_counter(), 0
                while time.perf_counter() - started < 2.0:
                    store.enqueue([make_record("cost")])
                    n += 1
                rates[mode] = round(n / (time.perf_counter() - started))
                assert sum(store.counts().values()) == n + 1
        finally:
            replica.destroy()
            primary.destroy()
    print(f"\nsingle-job enqueues per second, one producer, replica streaming: {rates}")
