"""How fast `skunq web` answers with a large store: ``python -m benchmarks.web_overview`` (``make bench-web``).

Fills one queue per backend with ``--jobs`` records (default 100,000) spread
over four routes, in a realistic mix of pending, complete and dead-lettered
jobs, starts a real ``skunq web`` on it and times whole HTTP requests for the
overview, the first page of jobs, the dead letters and /metrics. Each figure
is the median of ``--repeat`` requests after one warm-up request.

The overview and /metrics answer from the snapshot that the monitor's one
background reader refreshes (see skunkqueue_web.refresher), so the benchmark
also times that read of the store itself, in-process: it is what bounds how
fresh the counts are, and what the store pays per refresh interval.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from skunkqueue_web.snapshot import overview

from benchmarks.servers import MongoServer, RedisServer, Server
from skunkqueue import SkunkQueue, policy, serializer
from skunkqueue.backends import open_backend
from skunkqueue.record import JobRecord, new_id
from skunkqueue.testing.kit import free_port

ROUTES = ("email", "billing", "reports", "thumbnails")
PAGES = {"overview": "/", "jobs page 1": "/jobs", "dead letters": "/dead", "metrics": "/metrics"}
BATCH = 2000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fill(backend: str, url: str, queue: str, jobs: int) -> dict[str, int]:
    """``jobs`` records: 60% complete, 10% dead letters, 30% pending (a third of those not due yet)."""
    store = open_backend(queue, backend, url=url)
    payload = serializer.dumps_call((1, 2), {}, "json")
    now = time.time()
    for start in range(0, jobs, BATCH):
        batch = []
        for i in range(start, min(start + BATCH, jobs)):
            due = now + 3600 if i % 10 == 9 else now - 60
            batch.append(JobRecord(id=new_id(), queue=queue, route=ROUTES[i % len(ROUTES)], func="app.tasks:work",
                                   payload=payload, due=due, created=now))
        store.enqueue(batch)
    finished = {"complete": 0, "dead": 0}
    result = serializer.dumps(3, "json")
    to_finish = int(jobs * 0.7)
    while sum(finished.values()) < to_finish:
        progressed = False
        for route in ROUTES:
            want = min(500, to_finish - sum(finished.values()))
            if want <= 0:
                break
            for record in store.claim(route, "bench-worker", 600, want):
                progressed = True
                if (finished["complete"] + finished["dead"]) % 7 == 6:
                    error = {"type": "ValueError", "message": "bad input", "traceback": "Traceback ...\nValueError"}
                    store.finish(record.id, record.token, policy.failed(record, error))
                    finished["dead"] += 1
                else:
                    store.finish(record.id, record.token, policy.completed(result))
                    finished["complete"] += 1
        if not progressed:
            break
    counts = store.counts()
    store.close()
    return {state: sum(n for (_, s), n in counts.items() if s == state) for state in ("pending", "complete", "error")}


def timed(url: str) -> float:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as resp:
        resp.read()
    return time.perf_counter() - started


def measure(backend: str, url: str, queue: str, repeat: int) -> dict[str, dict[str, float]]:
    port = free_port()
    env = {**os.environ, "SKUNQ_BACKEND": backend, "SKUNQ_URL": url}
    env.pop("SKUNQ_WEB_TOKEN", None)
    web = subprocess.Popen([sys.executable, "-m", "skunkqueue.cli", "web", "-q", queue, "--port", str(port)],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                timed(base + "/metrics")
                break
            except OSError:
                if time.monotonic() > deadline or web.poll() is not None:
                    raise RuntimeError("skunq web did not start") from None
                time.sleep(0.2)
        figures = {}
        for name, path in PAGES.items():
            timed(base + path)  # warm-up: the first request opens the store's connection in its thread
            runs = [timed(base + path) for _ in range(repeat)]
            figures[name] = {"median_s": statistics.median(runs), "max_s": max(runs)}
        return figures
    finally:
        web.terminate()
        web.wait(20)


def store_read(backend: str, url: str, queue: str, repeat: int) -> dict[str, float]:
    q = SkunkQueue(queue, backend=backend, conn_url=url)
    runs = []
    for _ in range(repeat + 1):
        started = time.perf_counter()
        overview(q)
        runs.append(time.perf_counter() - started)
    q.close()
    runs = runs[1:]  # the first one also connects
    return {"median_s": statistics.median(runs), "max_s": max(runs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.web_overview", description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=100_000, help="records in the store (%(default)s)")
    p.add_argument("--backends", default="sqlite,redis",
                   help="comma-separated, of sqlite, redis, mongodb (%(default)s)")
    p.add_argument("--repeat", type=int, default=5, help="timed requests per page (%(default)s)")
    p.add_argument("--json", default="bench-results-web.json", help="where to write the figures (%(default)s)")
    args = p.parse_args(argv)
    results: dict[str, object] = {"jobs": args.jobs}
    for backend in args.backends.split(","):
        server: Server | None = None
        with tempfile.TemporaryDirectory(prefix="skunqbench-web-") as tmp:
            if backend == "sqlite":
                url = str(Path(tmp) / "web.db")
            elif backend == "redis":
                server = RedisServer().start()
                url = server.url
            elif backend == "mongodb" and MongoServer.available():
                server = MongoServer().start()
                url = server.url
            else:
                log(f"{backend}: not benchmarked here (sqlite, redis, mongodb where mongod is installed)")
                continue
            try:
                started = time.monotonic()
                mix = fill(backend, url, "webbench", args.jobs)
                log(f"{backend}: filled {args.jobs} jobs in {time.monotonic() - started:.0f} s: {mix}")
                figures = measure(backend, url, "webbench", args.repeat)
                figures["overview store read"] = store_read(backend, url, "webbench", args.repeat)
            finally:
                if server is not None:
                    server.stop()
        results[backend] = {"mix": mix, "pages": figures}
        for name, fig in figures.items():
            print(f"{backend:8} {name:20} median {fig['median_s'] * 1000:8.1f} ms   max {fig['max_s'] * 1000:8.1f} ms")
    Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
