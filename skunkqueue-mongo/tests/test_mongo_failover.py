"""MongoDB elections under load: a three-member replica set loses its primary while jobs flow.

Three ``mongod`` members from the same wheel (``tests/mongo_servers.py``
``MongoReplicaSet``, elections after 2 s of silence), a ``skunq work`` pool and
two producers (``fire`` and ``afire``), and a periodic job every second, on ``mongodb://a,b,c/?replicaSet=…``
with SkunkQueue's defaults: MongoDB's default write concern, which for this set
is ``majority``, and pymongo's retryable writes. The primary is SIGKILLed (and
restarted, to rejoin as a secondary) or asked to step down. Every fire, start
and end goes into a history outside the queue (``tests/history.py``), which the
checker reads: nothing acknowledged lost, no two attempts of a job at once, no
acknowledged job left unfinished, every periodic slot fired exactly once, and the same pool, never restarted, runs the
jobs fired after the election.

The CI version strikes twice (a SIGKILL, then a step-down); ``make chaos`` (SKUNQ_CHAOS=long) runs
eight alternating strikes.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import time
from pathlib import Path
from typing import Any, Iterator

import mongo_servers as servers
import pytest
from failover_load import Load
from history import Schedule, load

from skunkqueue.testing.kit import BackendUnderTest

LONG = os.environ.get("SKUNQ_CHAOS") == "long"


@pytest.fixture
def replset_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.MongoReplicaSet]:
    started = servers.MongoReplicaSet(tmp_path_factory.mktemp("mongo-rs3"))
    try:
        yield started.start()
    finally:
        started.stop()


def strike(rs: servers.MongoReplicaSet, kind: str) -> tuple[int, int, float]:
    """SIGKILL the primary (then restart it) or step it down; the old and new primaries' ports, seconds between."""
    old = rs.wait_primary()
    began = time.monotonic()
    if kind == "sigkill":
        old.stop(signal.SIGKILL)  # no shutdown, no step-down handshake, no last replication
    else:
        rs.step_down(old, seconds=10)
    new = rs.wait_primary(other_than=old)
    elected = time.monotonic() - began
    if kind == "sigkill":
        old.start()  # rejoins as a secondary; writes only it had (none were majority-acknowledged) roll back
    return old.port, new.port, elected


def run(rs: servers.MongoReplicaSet, queue_name: str, tmp_path: Path, kinds: list[str], per_phase: int,
        every: float = 0.02) -> None:
    backend = BackendUnderTest(name="mongodb", url=rs.url, db="failover")
    # Producers paced (``every`` between fires) near what one pool of 3 runs on a loaded 2-core
    # machine (~20-30 jobs/s), so the backlog, and the wait for it to drain, stays short.
    load_ = Load(backend, queue_name, tmp_path, pause=0.01, every=every)
    # The pool also runs a periodic job every second: each slot must fire once, elections or not.
    pool = load_.start_pool(concurrency=3, env={"SKUNQ_HISTORY": load_.history.path, "SKUNQ_HISTORY_EVERY": "1"})
    elections: list[str] = []
    kills = 0
    try:
        pool.wait_ready(60)
        window_start = time.time() + 3
        load_.start_producers()
        since = 0.0
        for kind in kinds:
            load_.wait_acked(per_phase, since, what=f"before the {kind}")
            old, new, took = strike(rs, kind)
            since = time.monotonic()
            elections.append(f"{kind} {old}->{new} in {took:.1f} s")
            # Kills right after the election: none of those jobs may start once kill() returned.
            kills += load_.kill_latest(5)
            # The same producers and the same pool carry on against the new primary.
            load_.wait_acked(per_phase, since, what=f"after the {kind}")
            rs.wait_healthy(timeout=90)
        window_stop = time.time() - 3
        load_.stop_producers()
        load_.drain(timeout=60 + 0.1 * per_phase * len(kinds))
        assert pool.process.poll() is None, f"the pool exited: {pool.log()}"
    finally:
        load_.close()
    report = load_.report(schedules={"tick": Schedule(every=1.0, start=window_start, stop=window_stop)})
    slots = sum(1 for e in load(load_.history.path) if e["op"] == "start" and e["token"].startswith("slot:"))
    events = load(load_.history.path)
    acked_at = {e["id"]: e["t"] for e in events if e["op"] == "ok"}
    first_start: dict[str, float] = {}
    for e in events:
        if e["op"] == "start":
            first_start.setdefault(e["id"], e["t"])
    waits = [first_start[i] - t for i, t in acked_at.items() if i in first_start]
    print(f"\nmongodb failover ({', '.join(elections)}): {report.summary()}; "
          f"median fire-to-start {statistics.median(waits):.2f} s; {slots} periodic slots fired; {kills} killed")
    assert report.ok, report.explain()
    assert kills, "no kill returned: the after-kill check saw nothing"
    assert not load_.unexpected_errors(), load_.unexpected_errors()[:5]


def test_a_sigkill_and_a_step_down_under_load_lose_nothing_acknowledged(replset_cluster: Any, queue_name: str,
                                                                       tmp_path: Path) -> None:
    run(replset_cluster, queue_name, tmp_path, ["sigkill", "stepdown"], per_phase=100)


@pytest.mark.chaos
@pytest.mark.timeout(1200)
@pytest.mark.skipif(not LONG, reason="long failover run: make chaos (SKUNQ_CHAOS=long)")
def test_eight_elections_under_load(replset_cluster: Any, queue_name: str, tmp_path: Path) -> None:
    kinds = [random.choice(["sigkill", "stepdown"]) for _ in range(8)]
    run(replset_cluster, queue_name, tmp_path, kinds, per_phase=300, every=0.05)
