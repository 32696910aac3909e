"""FoundationDB has no wall clock: leases are stamped with hosts' clocks, so a pool
refuses to start when its host's clock is further from a peer's than the lease
tolerates (``lease`` minus the renewal interval).

The skew is measured against the cluster's versions (about a million a second,
whatever any host's clock says), from the peers' heartbeats. Runs on the
stand-in (tests/fdb/standin, not a real FoundationDB) unless
SKUNKQUEUE_FDB_CLUSTER_FILE names a real cluster.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Iterator

import clockskew
import fdb_servers as servers
import pytest

from skunkqueue.persistence import Persistence
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import WorkerInfo
from skunkqueue.testing import BackendUnderTest, jobs
from skunkqueue.testing.workers import PoolProcess


@pytest.fixture
def backend(request: pytest.FixtureRequest, fdb_root: str) -> BackendUnderTest:
    if servers.REAL_CLUSTER_FILE:
        return BackendUnderTest(name="fdb", url=servers.REAL_CLUSTER_FILE, db=fdb_root, label="fdb (real cluster)")
    cluster = request.getfixturevalue("standin_cluster")
    return BackendUnderTest(name="fdb", url=cluster.cluster_file, db=fdb_root, env=servers.standin_env(),
                            label=servers.STANDIN_LABEL)


@pytest.fixture
def store(backend: BackendUnderTest) -> Iterator[Persistence]:
    opened = backend.open(backend.new_queue_name())
    yield opened
    opened.close()


def _register(store: Persistence, worker_id: str, monkeypatch: pytest.MonkeyPatch, skew: float) -> None:
    from skunkqueue_fdb import persistence as module

    real = time.time
    monkeypatch.setattr(module.time, "time", lambda: real() + skew)
    try:
        store.register_worker(WorkerInfo(id=worker_id, queue=store.queue, route="r", host="h", pid=1))
        assert store.heartbeat(worker_id, "idle")
    finally:
        monkeypatch.setattr(module.time, "time", real)


@pytest.mark.parametrize("skew", [-60.0, -3.0, 45.0])
def test_offsets_measure_a_peers_clock_against_the_clusters_versions(store: Persistence,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      skew: float) -> None:
    assert store.clock_offsets() == []
    _register(store, "peer", monkeypatch, skew)
    _register(store, "local", monkeypatch, 0.0)
    offsets = sorted(store.clock_offsets())
    assert len(offsets) == 2, offsets
    measured = offsets[0] if skew < 0 else offsets[1]
    other = offsets[1] if skew < 0 else offsets[0]
    assert abs(measured - skew) < 0.5, offsets
    assert abs(other) < 0.5, offsets
    store.unregister_worker("peer")
    [left] = store.clock_offsets()
    assert abs(left) < 0.5


def test_an_old_stamp_is_not_taken_for_a_skewed_clock(store: Persistence, monkeypatch: pytest.MonkeyPatch) -> None:
    # A peer that stopped heartbeating (or a stamp from before a cluster recovery, when versions
    # jump ahead) would look like a clock running behind: only stamps from the last 5 s count.
    from skunkqueue_fdb import persistence as module

    _register(store, "quiet", monkeypatch, 0.0)
    assert len(store.clock_offsets()) == 1
    time.sleep(module.CLOCK_STAMP_FRESH + 0.5)
    assert store.clock_offsets() == []


@pytest.mark.parametrize("skew", [60.0, -60.0])
def test_a_pool_whose_clock_is_off_by_more_than_the_lease_allows_refuses_to_start(
        backend: BackendUnderTest, tmp_path: Path, skew: float) -> None:
    queue_name = backend.new_queue_name()
    queue = SkunkQueue(queue_name, backend="fdb", conn_url=backend.url, dbname=backend.db, **backend.options)
    mark = queue.event(routes=["r"])(jobs.mark.func)
    ran = tmp_path / "ran"
    normal = PoolProcess(backend, queue_name, ["r"], lease=30, log_path=tmp_path / "normal.log")
    try:
        normal.wait_ready()
        skewed = PoolProcess(clockskew.skewed(backend, skew, tmp_path / "skew"), queue_name, ["r"], lease=30,
                             log_path=tmp_path / "skewed.log")
        code = skewed.wait(30)
        log = skewed.log()
        assert code == 1, log
        assert "Traceback" not in log, log
        [line] = [x for x in log.splitlines() if x.startswith("Error:")]  # one clear line
        direction = "ahead of" if skew > 0 else "behind"
        # The offset is measured through the store, so on a loaded machine it reads 59.9 as well as 60.1.
        offset = re.search(r"clock is (\d+\.\d) s", line)
        assert offset is not None and 55 <= float(offset.group(1)) <= 65, line
        assert direction in line and "at most 29 s" in line and "NTP" in line, line
        # The running pool is unharmed: it still runs jobs, once each.
        handle = mark.fire(str(ran), "after")
        assert isinstance(handle.wait(timeout=20), int)
        assert ran.read_text().splitlines() == ["after"]
    finally:
        normal.stop()
        queue.close()


def test_a_pool_within_the_bound_starts_and_shares_the_work(backend: BackendUnderTest, tmp_path: Path) -> None:
    queue_name = backend.new_queue_name()
    queue = SkunkQueue(queue_name, backend="fdb", conn_url=backend.url, dbname=backend.db, **backend.options)
    mark = queue.event(routes=["r"])(jobs.mark.func)
    ran = tmp_path / "ran"
    pools = [PoolProcess(backend, queue_name, ["r"], lease=30, log_path=tmp_path / "normal.log")]
    try:
        pools[0].wait_ready()
        # 20 s is over half the bound (29 s): it starts, with a warning.
        pools.append(PoolProcess(clockskew.skewed(backend, 20.0, tmp_path / "skew"), queue_name, ["r"], lease=30,
                                 log_path=tmp_path / "skewed.log"))
        pools[1].wait_ready()
        handles = [mark.fire(str(ran), f"job-{n}") for n in range(20)]
        for handle in handles:
            assert isinstance(handle.wait(timeout=20), int)
        assert sorted(ran.read_text().split()) == sorted(f"job-{n}" for n in range(20))
        assert "leases stay safe up to 29 s" in pools[1].log(), pools[1].log()
    finally:
        for pool in pools:
            pool.stop()
        queue.close()


def test_other_stores_measure_nothing(tmp_path: Path) -> None:
    # SQLite is one host; Redis and MongoDB decide times by their own clock (tests/redis, tests/mongo).
    from skunkqueue.persistence.sqlite import SQLitePersistence

    store: Any = SQLitePersistence("q", url=str(tmp_path / "db.sqlite"))
    try:
        assert store.clock_offsets() == []
    finally:
        store.close()


def test_a_running_pool_logs_an_error_when_a_peer_drifts_past_the_bound(
        backend: BackendUnderTest, store: Persistence, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # Clocks drift after start: the running pool compares again every CLOCK_CHECK_EVERY seconds.
    from skunkqueue import pool as pool_module
    from skunkqueue.worker import WorkerConfig

    pool = pool_module.WorkerPool(WorkerConfig(queue=store.queue, route="r", backend="fdb", url=backend.url,
                                               db=backend.db, lease=10), ["r"])
    pool.store = store
    pool.check_clock()  # alone: nothing to compare with
    _register(store, "drifted", monkeypatch, -12.0)
    now = time.monotonic()
    pool._upkeep(now)
    assert "clock" not in caplog.text, "not before CLOCK_CHECK_EVERY seconds have passed"
    pool._upkeep(now + pool_module.CLOCK_CHECK_EVERY + 1)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("12." in e and "at most 9 s" in e and "run twice" in e for e in errors), errors
