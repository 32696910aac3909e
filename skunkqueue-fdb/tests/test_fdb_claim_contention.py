"""Claims under contention on the fdb STAND-IN (not a real FoundationDB), with emulated latency.

Many claimers on one route must each get different records, and conflict
retries must stay rare: claims spread over the due index once they conflict.
Skipped with a real cluster (latency and conflict counts come from the stand-in).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import fdb_servers as servers
import pytest

from skunkqueue.persistence import Persistence
from skunkqueue.record import RUNNING, JobRecord, new_id
from skunkqueue.testing import BackendUnderTest

pytestmark = pytest.mark.skipif(bool(servers.REAL_CLUSTER_FILE),
                                reason="latency and conflict counts are the stand-in's; this run uses a real cluster")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(standin_cluster: Any, fdb_root: str, faults: Any) -> Iterator[Persistence]:
    backend = BackendUnderTest(name="fdb", url=standin_cluster.cluster_file, db=fdb_root)
    persistence = backend.open(backend.new_queue_name())
    yield persistence
    persistence.close()


def _records(queue: str, n: int) -> list[JobRecord]:
    now = time.time() - 1
    return [JobRecord(id=new_id(), queue=queue, route="r", func="skunkqueue.testing.jobs:add",
                      payload=b"[[1,2],{}]", due=now, created=now) for _ in range(n)]


def test_sixteen_claimers_share_out_a_backlog_with_few_conflicts(store: Persistence, faults: Any) -> None:
    records = _records(store.queue, 600)
    store.enqueue(records)
    faults.configure(request_latency_ms=1, commit_latency_ms=1)
    taken: list[list[str]] = [[] for _ in range(16)]
    start = threading.Barrier(16)

    def claimer(i: int) -> None:
        start.wait()
        while got := store.claim("r", f"w{i}", 60):
            taken[i] += [r.id for r in got]

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    everything = [job_id for ids in taken for job_id in ids]
    assert sorted(everything) == sorted(r.id for r in records)  # each exactly once
    assert store.counts() == {("r", RUNNING): 600}
    retries = faults.stats["conflicts"] / 600
    # The head-of-queue design retried about once per job here.
    assert retries < 0.3, f"{retries:.2f} conflict retries per job"


def test_one_claimer_keeps_strict_order(store: Persistence) -> None:
    records = _records(store.queue, 30)
    for record in records:
        store.enqueue([record])
    assert [store.claim("r", "w", 30)[0].id for _ in range(30)] == [r.id for r in records]


@pytest.mark.slow  # a benchmark run: `make test`, not the inner loop
def test_the_benchmark_runs(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.fdb_contention", "--claimers", "1,2",
                           "--seconds", "0.3", "--idle", "2", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "stand-in (not a real FoundationDB)" in done.stdout
    figures = json.loads(out.read_text())
    assert [r["claimers"] for r in figures["results"]] == [1, 2]
    assert all(r["claims"] > 0 and r["ceiling_per_s"] > 0 for r in figures["results"])
    assert [r["workers"] for r in figures["idle"]] == [2]
