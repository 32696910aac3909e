"""The benchmark runs end to end in a tiny mode and reports sane figures (no timing assertions)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


# A benchmark keeps both cores busy and times itself: alone, after the parallel pass (scripts/run-tests);
# `make test` runs it, not the inner loop.
@pytest.mark.serial
@pytest.mark.slow
def test_benchmark_tiny_sqlite(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--backends", "sqlite", "--no-huey", "--jobs", "200",
         "--fire", "200", "--batch", "1000", "--latency", "20", "--backlog", "2000", "--backlog-small", "200",
         "--json", str(out)],
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
