"""The flow-control rows of ``make bench`` (issue 25): what a limit that is configured but not
reached costs the processing rate.

The same jobs are processed by one pool of 2 workers three ways, in alternated rounds (the
machine's load moves; alternation spreads it over the three): with no limit; on a route with its
own limit (``queue.limit(route, concurrency=10_000, rate="1000000/s")``) that the run never
reaches; and with every job carrying a per-key ``Limit`` (100 keys, ``concurrency=10_000``) it
never reaches. The jobs/s rows are the median round's, first claim to last result; the ratio rows
are the median of the rounds' ratios (each limited round over the plain round of its set), with
their range in the notes. The issue's goal: the route limit costs at most 10% (ratio >= 0.90).
Pool rates move with the machine's load, so a CPU figure stands beside them: claim + finish one
job at a time in this process (and in a local Redis server, which runs the claim's flow rules),
jobs per CPU second with the route limit over without, median of 5 interleaved pairs (range in
the notes). It leaves out the job's own run and the pool's overhead, so it overstates the share.
Run alone: ``python -m benchmarks.flow_rows [--backends sqlite,postgres,redis,mongodb] [--flow-jobs N]``.
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
    ("flow_route_ratio", "... route limit / none, median round (goal >= 0.90)", "{:.2f}", True),
    ("flow_key_limit", "... per-key limit, not reached (jobs/s)", "{:,.0f}", True),
    ("flow_key_ratio", "... per-key limit / none, median round", "{:.2f}", True),
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


def _claim_rates(target: Any, n: int, repeats: int = 5) -> list[float]:
    """Claim-and-finish rates per CPU second of this process and the store's server where it tells
    (one job at a time, as a worker does), with a route limit never reached over without: one
    ratio per interleaved pair (the order alternates within the pairs)."""
    queues = {kind: target.queue(f"flow-claim-{kind}") for kind in ("plain", "route")}
    queues["route"].limit("bench", concurrency=10_000, rate="1000000/s")
    done = policy.completed(b"0")
    ratios = []
    try:
        for repeat in range(repeats):
            rate: dict[str, float] = {}
            for kind in ("plain", "route") if repeat % 2 == 0 else ("route", "plain"):
                queue = queues[kind]
                job = jobs.bind(queue, jobs.noop, "bench")
                job.fire_many([(i,) for i in range(n)])
                store = queue.persistence
                # CPU time, not wall time: what the claim costs, whatever else the machine runs.
                started, server = time.process_time(), _server_cpu(store)
                for _ in range(n):
                    [record] = store.claim("bench", "bench-claimer", 30.0, 1)
                    store.finish(record.id, record.token, done)
                used = time.process_time() - started + _server_cpu(store) - server
                rate[kind] = n / used
            ratios.append(rate["route"] / rate["plain"])
    finally:
        for queue in queues.values():
            queue.close()
    return ratios


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


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
    route_ratios = [r / p for r, p in zip(rates["route"], rates["plain"])]
    key_ratios = [k / p for k, p in zip(rates["key"], rates["plain"])]
    claim_ratios = _claim_rates(target, min(n, 1000))
    result.figures.update(flow_plain=plain, flow_route_limit=route, flow_route_ratio=statistics.median(route_ratios),
                          flow_key_limit=key, flow_key_ratio=statistics.median(key_ratios),
                          flow_claim_ratio=statistics.median(claim_ratios))
    result.notes.append(
        f"flow rows: {n} jobs x {rounds} alternated rounds per kind, one pool of {WORKERS} workers; "
        f"rounds (jobs/s) plain {[round(r) for r in rates['plain']]}, route {[round(r) for r in rates['route']]}, "
        f"key {[round(r) for r in rates['key']]}; per-round ratio, median (range): route {_spread(route_ratios)}, "
        f"key {_spread(key_ratios)}; 1-minute load average {min(loads):.1f}-{max(loads):.1f} "
        f"on {os.cpu_count()} cores")
    result.notes.append(f"flow rows: claim+finish of {min(n, 1000)} jobs in this process (and a Redis server), "
                        f"per CPU second, route limit / none, {len(claim_ratios)} interleaved pairs: "
                        f"median (range) {_spread(claim_ratios)}")


def main(argv: list[str] | None = None) -> int:
    from benchmarks import skunk
    from benchmarks.servers import MongoServer, PostgresServer, RedisServer

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
        elif name == "mongodb":
            with MongoServer() as mongo_server:
                run(skunk.Target("mongodb", url=mongo_server.url, db="skunqbench", logdir=workdir,
                                 log_level="WARNING"), args, result, log)
        else:
            raise SystemExit(f"flow_rows runs on sqlite, postgres, redis and mongodb, not {name!r}")
        for key, label, fmt, _ in ROWS:
            if key in result.figures:
                print(f"{name:10} {label:48} {fmt.format(result.figures[key])}")
        for note in result.notes + result.errors:
            print(f"{name:10} {note}")
        print(f"{name:10} took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
