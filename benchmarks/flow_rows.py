"""The flow-control rows of ``make bench`` (issue 25): what a limit that is configured but not
reached costs the processing rate.

The same jobs are processed by one pool of 2 workers three ways, in alternated rounds (the
machine's load moves; alternation spreads it over the three): with no limit; on a route with its
own limit (``queue.limit(route, concurrency=10_000, rate="1000000/s")``) that the run never
reaches; and with every job carrying a per-key ``Limit`` (100 keys, ``concurrency=10_000``) it
never reaches. Each figure is the median round's jobs/s, first claim to last result. The issue's
goal: the route limit costs at most 10% (ratio >= 0.90).
Run alone: ``python -m benchmarks.flow_rows [--backends sqlite,postgres,redis] [--flow-jobs N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks import jobs
from benchmarks.common import BenchError, Result, stop_process, wait_until
from skunkqueue import COMPLETE, Limit, policy
from skunkqueue.job import Job

ROWS = [
    ("flow_plain", "processing, no limit, 2 workers (jobs/s)", "{:,.0f}", True),
    ("flow_route_limit", "... route limit set, not reached (jobs/s)", "{:,.0f}", True),
    ("flow_route_ratio", "... route limit / none (goal >= 0.90)", "{:.2f}", True),
    ("flow_key_limit", "... per-key limit, not reached (jobs/s)", "{:,.0f}", True),
    ("flow_key_ratio", "... per-key limit / none", "{:.2f}", True),
    ("flow_claim_ratio", "claim+finish per CPU second, route limit / none", "{:.2f}", True),
]
JOBS = 3000
ROUNDS = 3
WORKERS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-flow", action="store_true", help="skip the flow-control rows")
    parser.add_argument("--flow-jobs", type=int, default=None,
                        help=f"jobs per flow-control round (default: --jobs if given, else {JOBS})")
    parser.add_argument("--flow-rounds", type=int, default=ROUNDS, help="rounds of each kind (%(default)s)")


def _rate(target: Any, kind: str, n: int) -> float:
    """Jobs/s of one round: ``n`` jobs queued first, then a pool of WORKERS, first claim to last result."""
    queue = target.queue(f"flow-{kind}")
    try:
        job = jobs.bind(queue, jobs.noop, "bench")
        if kind == "key":
            job = Job(queue, jobs.noop.func, ["bench"], limit=Limit(key=lambda i: i % 100, concurrency=10_000))
        if kind == "route":
            queue.limit("bench", concurrency=10_000, rate="1000000/s")
        handles = []
        for start in range(0, n, 1000):
            handles += job.fire_many([(i,) for i in range(start, min(n, start + 1000))])
        first = handles[0]
        pool = target.start_workers(queue, "bench", WORKERS)
        try:
            def started() -> bool:
                if pool.poll() is not None:
                    raise BenchError(f"the pool exited with {pool.returncode}:\n{target.log_tail()}")
                return first.state != "pending"

            t0 = wait_until(started, 300, "the first job to be claimed")
            t1 = wait_until(lambda: queue.counts().get(("bench", COMPLETE), 0) >= n, 600, "every job to finish",
                            pause=0.01)
        finally:
            stop_process(pool)
        return n / (t1 - t0)
    finally:
        queue.close()


def _server_cpu(store: Any) -> float:
    """CPU seconds the store's server has used, where it says (Redis: ``INFO cpu``), else 0: the
    Redis claim's flow rules run in the server, where this process's CPU time does not see them."""
    info = getattr(getattr(store, "client", None), "info", None)
    if info is None:
        return 0.0
    try:
        cpu = info("cpu")
        return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])
    except Exception:  # not a single Redis server (a cluster answers per node): this process only
        return 0.0


def _claim_rates(target: Any, n: int, repeats: int = 5) -> tuple[float, float]:
    """Best claim-and-finish rates per CPU second of this process and the store's server where it
    tells (one job at a time, as a worker does), on a route without a limit and on one with a limit
    never reached; interleaved."""
    queues = {kind: target.queue(f"flow-claim-{kind}") for kind in ("plain", "route")}
    queues["route"].limit("bench", concurrency=10_000, rate="1000000/s")
    done = policy.completed(b"0")
    best = {"plain": 0.0, "route": 0.0}
    try:
        for _ in range(repeats):
            for kind, queue in queues.items():
                job = jobs.bind(queue, jobs.noop, "bench")
                job.fire_many([(i,) for i in range(n)])
                store = queue.persistence
                # CPU time, not wall time: what the claim costs, whatever else the machine runs.
                started, server = time.process_time(), _server_cpu(store)
                for _ in range(n):
                    [record] = store.claim("bench", "bench-claimer", 30.0, 1)
                    store.finish(record.id, record.token, done)
                used = time.process_time() - started + _server_cpu(store) - server
                best[kind] = max(best[kind], n / used)
    finally:
        for queue in queues.values():
            queue.close()
    return best["plain"], best["route"]


def run(target: Any, args: argparse.Namespace, result: Result, log: Callable[[str], None]) -> None:
    if getattr(args, "no_flow", False):
        return
    probe = target.queue("flow-probe")
    try:
        if not probe.persistence.supports_limits:
            result.notes.append(f"flow rows: the {target.backend} backend enforces no limits")
            return
    finally:
        probe.close()
    n = getattr(args, "flow_jobs", None) or getattr(args, "jobs", None) or JOBS
    rounds = getattr(args, "flow_rounds", ROUNDS)
    rates: dict[str, list[float]] = {"plain": [], "route": [], "key": []}
    loads = []
    try:
        for round_ in range(rounds):
            for kind in ("plain", "route", "key") if round_ % 2 == 0 else ("key", "route", "plain"):
                log(f"  {result.system}: flow round {round_ + 1}/{rounds}, {kind}, {n} jobs")
                rates[kind].append(_rate(target, kind, n))
                loads.append(os.getloadavg()[0])
    except Exception as exc:  # keep going: the other rows still say something
        result.check("flow", False, f"{type(exc).__name__}: {exc}")
        return
    plain, route, key = (statistics.median(rates[k]) for k in ("plain", "route", "key"))
    claim_plain, claim_route = _claim_rates(target, min(n, 1000))
    result.figures["flow_claim_ratio"] = claim_route / claim_plain
    result.notes.append(f"flow rows: claim+finish in this process (and a Redis server), best of 5, per CPU second: "
                        f"{claim_plain:,.0f} "
                        f"jobs without a limit, {claim_route:,.0f} with the route limit")
    result.figures.update(flow_plain=plain, flow_route_limit=route, flow_route_ratio=route / plain,
                          flow_key_limit=key, flow_key_ratio=key / plain)
    result.notes.append(
        f"flow rows: {n} jobs x {rounds} alternated rounds per kind, one pool of {WORKERS} workers; "
        f"rounds (jobs/s) plain {[round(r) for r in rates['plain']]}, route {[round(r) for r in rates['route']]}, "
        f"key {[round(r) for r in rates['key']]}; 1-minute load average {min(loads):.1f}-{max(loads):.1f} "
        f"on {os.cpu_count()} cores")


def main(argv: list[str] | None = None) -> int:
    from benchmarks import skunk
    from benchmarks.servers import PostgresServer, RedisServer

    parser = argparse.ArgumentParser(prog="python -m benchmarks.flow_rows", description=__doc__)
    parser.add_argument("--backends", default="sqlite")
    add_arguments(parser)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="skunqbench-flow-"))

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    for name in args.backends.split(","):
        result = Result(name)
        started = time.monotonic()
        if name == "sqlite":
            run(skunk.Target("sqlite", url=str(workdir / "flow.db"), logdir=workdir, log_level="WARNING"),
                args, result, log)
        elif name == "postgres":
            with PostgresServer() as server:
                run(skunk.Target("postgres", url=server.url, logdir=workdir, log_level="WARNING"), args, result, log)
        elif name == "redis":
            with RedisServer() as redis_server:
                run(skunk.Target("redis", url=redis_server.url, logdir=workdir, reset=redis_server.flush,
                                 log_level="WARNING"), args, result, log)
        else:
            raise SystemExit(f"flow_rows runs on sqlite, postgres and redis, not {name!r}")
        for key, label, fmt, _ in ROWS:
            if key in result.figures:
                print(f"{name:10} {label:48} {fmt.format(result.figures[key])}")
        for note in result.notes + result.errors:
            print(f"{name:10} {note}")
        print(f"{name:10} took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
