"""The workloads on SkunkQueue, for one backend."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from benchmarks import jobs
from benchmarks.common import (
    ROOT,
    BenchError,
    Result,
    Sizes,
    idle_cpu_percent,
    percentile,
    rate,
    rss_mb,
    stop_process,
    wait_until,
)
from skunkqueue import COMPLETE, PENDING, RUNNING, SkunkQueue, policy
from skunkqueue.persistence import Persistence
from skunkqueue.testing.kit import kit_env


@dataclass
class Target:
    """One backend and where its store is."""

    backend: str
    url: str | None = None
    db: str | None = None
    logdir: Path = Path(".")
    prefetch: int | None = None          # None: the worker's default
    reset: Callable[[], None] | None = None  # empties the store between workloads
    options: dict[str, Any] = field(default_factory=dict)
    log_level: str = "INFO"              # skunq work's default: a log line per job, as users run it

    def queue(self, purpose: str) -> SkunkQueue:
        return SkunkQueue(f"bench-{purpose}-{uuid.uuid4().hex[:8]}", backend=self.backend,
                          conn_url=self.url, dbname=self.db, **self.options)

    def start_workers(self, queue: SkunkQueue, route: str, concurrency: int) -> subprocess.Popen[bytes]:
        """``skunq work`` (a WorkerPool) with ``concurrency`` worker processes, logging warnings only."""
        cmd = [sys.executable, "-m", "skunkqueue.cli", "work", "-q", queue.name, "-r", route,
               "-c", str(concurrency), "--backend", self.backend, "--path", str(ROOT),
               "--import", "benchmarks.jobs", "--log-level", self.log_level]
        if self.url:
            cmd += ["--url", self.url]
        if self.db:
            cmd += ["--db", self.db]
        if self.prefetch:
            cmd += ["--prefetch", str(self.prefetch)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SKUNQ_")}
        env.update(kit_env(queue.name, [route]))
        with open(self.logdir / f"workers-{self.backend}.log", "ab") as log:
            return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)

    def log_tail(self) -> str:
        path = self.logdir / f"workers-{self.backend}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _worker_pids(backend: Persistence, route: str) -> list[int]:
    return [w.pid for w in backend.workers() if w.route == route]


def _wait_registered(target: Target, backend: Persistence, route: str, n: int, pool: subprocess.Popen[bytes],
                     timeout: float) -> list[int]:
    def ready() -> bool:
        if pool.poll() is not None:
            raise BenchError(f"the worker pool exited with {pool.returncode}:\n{target.log_tail()}")
        return len(_worker_pids(backend, route)) >= n
    wait_until(ready, timeout, f"{n} worker(s) to register", pause=0.02)
    return _worker_pids(backend, route)


def _fire_many(job: jobs.Job, n: int, chunk: int) -> list[Any]:
    handles: list[Any] = []
    for start in range(0, n, chunk):
        handles += job.fire_many(range(start, min(n, start + chunk)))
    return handles


def _check_results(result: Result, name: str, backend: Persistence, ids: list[str]) -> None:
    """Every job complete, each with its own argument as result."""
    from skunkqueue import serializer

    bad = []
    for i, job_id in enumerate(ids):
        record = backend.get(job_id)
        if record is None or record.state != COMPLETE or record.result is None \
                or serializer.loads(record.result, record.serializer) != i:
            bad.append((job_id, None if record is None else record.state))
    result.check(name, not bad, f"{len(bad)} of {len(ids)} jobs not complete with the right result: {bad[:3]}")


def enqueue(target: Target, sizes: Sizes, result: Result) -> None:
    queue = target.queue("enqueue")
    try:
        job = jobs.bind(queue, jobs.noop, "e")
        job.fire(-1)  # connect first
        start = time.perf_counter()
        for i in range(sizes.fire):
            job.fire(i)
        result.figures["enqueue_fire"] = rate(sizes.fire, time.perf_counter() - start)
        start = time.perf_counter()
        _fire_many(job, sizes.batch, sizes.batch_size)
        result.figures["enqueue_batch"] = rate(sizes.batch, time.perf_counter() - start)
        pending = queue.counts().get(("e", PENDING), 0)
        result.check("enqueue_stored", pending == sizes.fire + sizes.batch + 1,
                     f"{pending} pending, expected {sizes.fire + sizes.batch + 1}")
        queue.purge("e")
    finally:
        queue.close()


def processing(target: Target, sizes: Sizes, result: Result, workers: int) -> None:
    """``sizes.process`` jobs queued first; then the pool starts; time first claim -> last result."""
    queue = target.queue(f"process{workers}")
    backend = queue.persistence
    try:
        job = jobs.bind(queue, jobs.noop, "p")
        handles = _fire_many(job, sizes.process, sizes.batch_size)
        ids = [h.id for h in handles]
        first, last = handles[0], handles[-1]
        pool = target.start_workers(queue, "p", workers)
        try:
            def started() -> bool:
                if pool.poll() is not None:
                    raise BenchError(f"the worker pool exited with {pool.returncode}:\n{target.log_tail()}")
                return first.state != PENDING

            # Read through handles, as a user's code would.
            t0 = wait_until(started, sizes.timeout, "the first job to be claimed")
            t1 = wait_until(lambda: last.state not in (PENDING, RUNNING), sizes.timeout, "the last job to finish")
            # With several workers the last fired is not always the last done.
            t1 = wait_until(lambda: queue.counts().get(("p", COMPLETE), 0) >= sizes.process,
                            sizes.timeout, "every job to finish")
        finally:
            stop_process(pool)
        result.figures[f"process_{workers}w"] = rate(sizes.process, t1 - t0)
        _check_results(result, f"process_{workers}w_complete", backend, ids)
    finally:
        queue.close()


def latency(target: Target, sizes: Sizes, result: Result) -> None:
    """Idle round trips fire -> handle.wait() with one worker; then its idle RSS and CPU."""
    queue = target.queue("latency")
    backend = queue.persistence
    try:
        job = jobs.bind(queue, jobs.noop, "l")
        pool = target.start_workers(queue, "l", 1)
        try:
            pids = _wait_registered(target, backend, "l", 1, pool, 60)
            for i in range(5):  # warm up: imports, connections
                job.fire(i).wait(timeout=30)
            samples, wrong = [], 0
            for i in range(sizes.latency):
                time.sleep(sizes.latency_gap)
                start = time.perf_counter()
                value = job.fire(i).wait(timeout=30)
                samples.append(time.perf_counter() - start)
                wrong += value != i
            result.check("latency_results", wrong == 0, f"{wrong} wrong results")
            result.figures["latency_p50_ms"] = 1000 * percentile(samples, 50)
            result.figures["latency_p99_ms"] = 1000 * percentile(samples, 99)
            time.sleep(1.0)
            result.figures["idle_rss_mb"] = rss_mb(pids[0])
            result.figures["idle_cpu_pct"] = idle_cpu_percent(pids[0])
        finally:
            stop_process(pool)
    finally:
        queue.close()


def _launch_to_result(target: Target, queue: SkunkQueue, handle: Any, timeout: float) -> float:
    """Start ``skunq work``; seconds until ``handle``'s job is complete."""
    start = time.perf_counter()
    pool = target.start_workers(queue, "s", 1)
    try:
        def done() -> bool:
            if pool.poll() is not None:
                raise BenchError(f"the worker pool exited with {pool.returncode}:\n{target.log_tail()}")
            return bool(handle.state == COMPLETE)

        wait_until(done, timeout, "the first job's result")
        return time.perf_counter() - start
    finally:
        stop_process(pool)


def startup(target: Target, sizes: Sizes, result: Result, repeats: int = 3) -> None:
    """``skunq work`` launched with one job waiting: seconds until that job's result is there (median)."""
    queue = target.queue("startup")
    try:
        job = jobs.bind(queue, jobs.noop, "s")
        samples = []
        for i in range(repeats):
            handle = job.fire(i)
            samples.append(_launch_to_result(target, queue, handle, sizes.timeout))
            result.check("startup_result", handle.result == i, f"start-up job {i} returned {handle.result!r}")
        result.figures["startup_s"] = percentile(samples, 50)
    finally:
        queue.close()


def _claim_rate(backend: Persistence, route: str, n: int) -> float:
    """Claim-and-finish ``n`` jobs one at a time in this process, the way a worker does."""
    done = policy.completed(b"0")
    start = time.perf_counter()
    for _ in range(n):
        records = backend.claim(route, "bench-claimer", 30.0, 1)
        if not records:
            raise BenchError("the backlog ran dry during the claim measurement")
        backend.finish(records[0].id, records[0].token, done)
    return rate(n, time.perf_counter() - start)


def backlog(target: Target, sizes: Sizes, result: Result, repeats: int = 3) -> None:
    """Claim rate with ``sizes.backlog`` jobs queued vs ``sizes.backlog_small``; measurements interleaved."""
    claims = min(sizes.claims, sizes.backlog_small)
    small_q, large_q = target.queue("backlog-small"), target.queue("backlog-large")
    try:
        small_job = jobs.bind(small_q, jobs.noop, "b")
        start = time.perf_counter()
        _fire_many(jobs.bind(large_q, jobs.noop, "b"), sizes.backlog, max(sizes.batch_size, 5000))
        result.figures["backlog_enqueue"] = rate(sizes.backlog, time.perf_counter() - start)
        _fire_many(small_job, sizes.backlog_small, sizes.batch_size)
        _claim_rate(small_q.persistence, "b", 10)  # warm up both connections
        _claim_rate(large_q.persistence, "b", 10)
        small: list[float] = []
        large: list[float] = []
        for _ in range(repeats):
            # Top the small queue up to exactly backlog_small before each measurement.
            _fire_many(small_job, sizes.backlog_small - small_q.counts().get(("b", PENDING), 0),
                       sizes.batch_size)
            small.append(_claim_rate(small_q.persistence, "b", claims))
            large.append(_claim_rate(large_q.persistence, "b", claims))
        small_q.purge("b")
        large_q.purge("b")
    finally:
        small_q.close()
        large_q.close()
    result.figures["claim_rate_small"] = max(small)
    result.figures["claim_rate_large"] = max(large)
    result.figures["backlog_ratio"] = max(large) / max(small)


def run(target: Target, sizes: Sizes, result: Result, log: Callable[[str], None]) -> None:
    steps: list[tuple[str, Callable[[], None]]] = [
        ("enqueue", lambda: enqueue(target, sizes, result)),
        ("processing, 1 worker", lambda: processing(target, sizes, result, 1)),
        ("processing, 2 workers", lambda: processing(target, sizes, result, 2)),
        ("latency and idle worker", lambda: latency(target, sizes, result)),
        ("worker start-up", lambda: startup(target, sizes, result)),
        ("backlog", lambda: backlog(target, sizes, result)),
    ]
    for name, step in steps:
        log(f"  {result.system}: {name}")
        try:
            step()
        except Exception as exc:  # keep going: the other workloads still say something
            result.check(name, False, f"{type(exc).__name__}: {exc}")
        if target.reset:
            target.reset()
