"""The benchmark runs end to end in a tiny mode and reports sane figures (no timing assertions)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


# No figure is asserted, so these run in the parallel pass, where their sleeps (an idle worker's CPU,
# 0.5 s async jobs: 12 CPU-s in 30 s here) overlap other tests; `make test` runs them, not the inner loop.
@pytest.mark.slow
def test_benchmark_tiny_sqlite(tmp_path: Path) -> None:
    # Without the FoundationDB contention run (62 of this test's 97 s): it has a test of its own,
    # skunkqueue-fdb/tests/test_fdb_claim_contention.py.
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--backends", "sqlite", "--no-huey", "--jobs", "200",
         "--fire", "200", "--batch", "1000", "--latency", "20", "--backlog", "2000", "--backlog-small", "200",
         "--members", "500", "--flow-rounds", "2", "--no-fdb-contention", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "processing, 1 worker process" in done.stdout
    assert "all jobs completed, right results" in done.stdout
    assert "worker start-up, launch->first result (s)" in done.stdout
    assert "SQLite idle latency p50 ms" in done.stdout  # issue 17's goals table
    report = json.loads(out.read_text())
    assert report["all_checks_passed"] is True
    sqlite = report["results"]["sqlite"]
    assert sqlite["errors"] == []
    assert sqlite["checks"] and all(sqlite["checks"].values())
    for name in ("process_1w_complete", "process_2w_complete", "latency_results", "enqueue_stored",
                 "startup_result"):
        assert sqlite["checks"][name] is True
    figures = sqlite["figures"]
    for key in ("enqueue_fire", "enqueue_batch", "process_1w", "process_2w", "latency_p50_ms",
                "latency_p99_ms", "claim_rate_small", "claim_rate_large", "backlog_ratio", "idle_rss_mb",
                "startup_s"):
        assert math.isfinite(figures[key]) and figures[key] > 0, (key, figures[key])
    assert figures["latency_p50_ms"] <= figures["latency_p99_ms"]
    assert 1 < figures["idle_rss_mb"] < 1000
    # The tracing rows: both modes ran, and "on" exported a span per fire and per attempt.
    assert sqlite["checks"]["otel_spans"] is True
    assert math.isfinite(figures["otel_fire_us"]) and math.isfinite(figures["otel_worker_us"])
    assert "tracing on: worker cost added (us/job)" in done.stdout
    # The flow-control rows: a limit set but not reached, against none.
    for key in ("flow_plain", "flow_route_limit", "flow_route_ratio", "flow_key_limit", "flow_key_ratio"):
        assert math.isfinite(figures[key]) and figures[key] > 0, (key, figures[key])


def test_peer_rounds_alternate_and_ratios_favour_the_better() -> None:
    from benchmarks.peers import PeerRuns, order, ratios

    names = ["skunkqueue", "huey", "celery"]
    assert [order(names, r) for r in range(3)] == [names, names[::-1], names]
    ours = PeerRuns("skunkqueue", rounds=[{"enqueue_fire": 200.0, "latency_p50_ms": 2.0},
                                          {"enqueue_fire": 100.0, "latency_p50_ms": 4.0}])
    theirs = PeerRuns("huey", rounds=[{"enqueue_fire": 100.0, "latency_p50_ms": 1.0},
                                      {"enqueue_fire": 100.0, "latency_p50_ms": 1.0}])
    got = ratios({"skunkqueue": ours, "huey": theirs})["huey"]
    # A rate: ours / theirs; a time: theirs / ours. Either way above 1 only when SkunkQueue is better.
    assert got["enqueue_fire"] == {"ratio": 1.5, "low": 1.0, "high": 2.0}
    assert got["latency_p50_ms"] == {"ratio": 1 / 3, "low": 0.25, "high": 0.5}


@pytest.mark.slow
def test_peers_tiny_round_every_library(tmp_path: Path) -> None:
    """One tiny round of SkunkQueue, Huey, Celery, RQ and Dramatiq, each through its own worker command."""
    from benchmarks.peer_systems import DEFAULT, PEERS

    missing = [name for name in DEFAULT if not PEERS[name].available()]
    assert not missing, f"pip install -r requirements-dev.txt: {missing} not installed"
    out = tmp_path / "peers.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.peers", "--rounds", "1", "--fire", "60",
                           "--latency", "5", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Set-ups (each library's fastest documented one for each figure)" in done.stdout
    assert "notify_result=True" in done.stdout and "SimpleWorker" in done.stdout and "-P solo" in done.stdout
    report = json.loads(out.read_text())
    assert list(report["systems"]) == DEFAULT
    for figures in _round_figures(report):
        assert figures["idle_rss_mb"] <= figures["idle_rss_all_mb"]
    assert list(report["ratios"]) == DEFAULT[1:]


@pytest.mark.slow
def test_postgres_peers_tiny_round(tmp_path: Path) -> None:
    """One tiny round of SkunkQueue on PostgreSQL and of Procrastinate, each through its own worker command."""
    from benchmarks.peer_systems import DEFAULT_POSTGRES, PEERS
    from benchmarks.servers import PostgresServer

    if not PostgresServer.available():
        pytest.skip("no PostgreSQL binaries: scripts/ensure-servers installs them")
    missing = [name for name in DEFAULT_POSTGRES if not PEERS[name].available()]
    assert not missing, f"pip install -r requirements-dev.txt: {missing} not installed"
    out = tmp_path / "peers.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.peers", "--store", "postgres", "--rounds", "1",
                           "--fire", "30", "--latency", "5", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "PostgreSQL, one worker process each" in done.stdout
    assert "procrastinate --app benchmarks.procrastinate_app.app worker" in done.stdout
    report = json.loads(out.read_text())
    assert list(report["systems"]) == DEFAULT_POSTGRES
    _round_figures(report)
    assert list(report["ratios"]) == ["procrastinate"]
    assert set(report["ratios"]["procrastinate"]) >= {"enqueue_fire", "process_1w", "latency_p50_ms"}


def test_procrastinate_round_reports_unfinished_jobs(monkeypatch: Any) -> None:
    """Procrastinate keeps no results: a job that did not succeed must fail the round, not pass the check."""
    from benchmarks import peer_systems, peers
    from benchmarks.common import Sizes
    from benchmarks.servers import PostgresServer

    if not PostgresServer.available():
        pytest.skip("no PostgreSQL binaries: scripts/ensure-servers installs them")

    class Failing(peer_systems.ProcrastinatePeer):
        name = "procrastinate-failing"

        def fire(self, i: int) -> Any:  # to a queue no worker takes: the jobs stay "todo"
            job_id = self.task.configure(queue="elsewhere").defer(i=i)
            self.args[job_id] = i
            return job_id

        def done(self, handle: Any) -> bool:  # counts a job as done when it was not run at all
            return True

    monkeypatch.setitem(peer_systems.PEERS, Failing.name, Failing)
    with PostgresServer() as server:
        assert isinstance(server, PostgresServer)
        runs = peers.run(server.database_url(peers.PG_DATABASE), lambda: server.recreate(peers.PG_DATABASE),
                         Sizes(fire=5, latency=2), 1, [Failing.name], Path(server.directory), lambda line: None)
    assert runs[Failing.name].rounds == []
    (error,) = runs[Failing.name].errors
    assert "processing: 6 of 6 results wrong" in error


def test_peer_round_reports_wrong_results(monkeypatch: Any) -> None:
    """A library that hands back a wrong result fails its round instead of adding figures."""
    from benchmarks import peer_systems, peers
    from benchmarks.common import Sizes
    from benchmarks.servers import RedisServer

    class OffByOne(peer_systems.HueyPeer):
        name = "off-by-one"

        def value(self, handle: Any) -> Any:
            return super().value(handle) + 1

    monkeypatch.setitem(peer_systems.PEERS, OffByOne.name, OffByOne)
    with RedisServer() as server:
        assert isinstance(server, RedisServer)
        runs = peers.run(server.url, server.flush, Sizes(fire=10, latency=2), 1, [OffByOne.name],
                         Path(server.directory), lambda line: None)
    assert runs[OffByOne.name].rounds == []
    (error,) = runs[OffByOne.name].errors
    assert "processing: 11 of 11 results wrong" in error


def _round_figures(report: dict[str, Any]) -> list[dict[str, float]]:
    """Each system's one round, checked: no errors, every figure finite and positive, p50 <= p99."""
    rounds = []
    for name, system in report["systems"].items():
        assert system["errors"] == [], (name, system["errors"])
        (figures,) = system["rounds"]
        for key in ("enqueue_fire", "process_1w", "latency_p50_ms", "latency_p99_ms", "startup_s",
                    "idle_rss_mb", "idle_rss_all_mb"):
            assert math.isfinite(figures[key]) and figures[key] > 0, (name, key, figures[key])
        assert figures["latency_p50_ms"] <= figures["latency_p99_ms"]
        rounds.append(figures)
    return rounds
