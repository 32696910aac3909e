"""``python -m benchmarks``: run every workload on every installed backend, print one table; then SkunkQueue
against Huey, Celery, RQ and Dramatiq on one redis-server, and against Procrastinate on one PostgreSQL
server, in alternated rounds (``benchmarks.peers``)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

from benchmarks import async_rows, fdb_contention, flow_rows, huey_bench, peers, skunk, workflow_rows
from benchmarks.common import Result, Sizes, compile_sources
from benchmarks.servers import MongoServer, PostgresServer, RedisServer, Server
from skunkqueue import backends as registry

try:
    from benchmarks import otel_cost
except ImportError:  # skunkqueue-otel (and the OpenTelemetry SDK) not installed: no tracing rows
    otel_cost = None  # type: ignore[assignment]
OTEL_ROWS = otel_cost.ROWS if otel_cost is not None else []

BACKENDS = ("sqlite", "redis", "mongodb", "postgres")

# (key, label, format, higher is better)
ROWS = [
    ("enqueue_fire", "enqueue, fire() one by one (jobs/s)", "{:,.0f}", True),
    ("enqueue_batch", "enqueue, fire_many() batches (jobs/s)", "{:,.0f}", True),
    ("process_1w", "processing, 1 worker process (jobs/s)", "{:,.0f}", True),
    ("process_2w", "processing, 2 worker processes (jobs/s)", "{:,.0f}", True),
    ("scaling_2w", "2 workers / 1 worker", "{:.2f}x", True),
    ("latency_p50_ms", "idle latency fire->result p50 (ms)", "{:.2f}", False),
    ("latency_p99_ms", "idle latency fire->result p99 (ms)", "{:.2f}", False),
    ("claim_rate_small", "claim+finish, small backlog (jobs/s)", "{:,.0f}", True),
    ("claim_rate_large", "claim+finish, large backlog (jobs/s)", "{:,.0f}", True),
    ("backlog_ratio", "backlog ratio (large / small)", "{:.2f}", True),
    ("startup_s", "worker start-up, launch->first result (s)", "{:.2f}", False),
    ("idle_rss_mb", "idle worker RSS (MB)", "{:.1f}", False),
    ("idle_cpu_pct", "idle worker CPU (%)", "{:.2f}", False),
    *async_rows.ROWS,
    *workflow_rows.ROWS,
    *flow_rows.ROWS,
    *OTEL_ROWS,
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma-separated backends to run, if installed (default: %(default)s)")
    p.add_argument("--no-huey", action="store_true", help="skip SqliteHuey and Huey's async rows")
    p.add_argument("--no-peers", action="store_true",
                   help="skip the alternated comparisons with Huey, Celery, RQ and Dramatiq on Redis and "
                        "with Procrastinate on PostgreSQL")
    peers.add_arguments(p)
    p.add_argument("--quick", action="store_true",
                   help="small sizes for a fast look (1,000 jobs, 10,000 backlog; peers: 1 round unless --rounds)")
    p.add_argument("--jobs", type=int, help="jobs pre-enqueued for the processing runs (default 5000)")
    p.add_argument("--fire", type=int, help="jobs fired one by one (default 5000)")
    p.add_argument("--batch", type=int, help="jobs fired with fire_many (default 20000)")
    p.add_argument("--batch-size", type=int, help="jobs per fire_many call (default 1000)")
    p.add_argument("--latency", type=int, help="fire->result round trips (default 300)")
    p.add_argument("--backlog", type=int, help="jobs queued for the large backlog (default 100000)")
    p.add_argument("--backlog-small", type=int, help="jobs queued for the small backlog (default 1000)")
    p.add_argument("--prefetch", type=int, help="--prefetch passed to the workers (default: theirs)")
    p.add_argument("--mongo-standalone", action="store_true",
                   help="run mongod standalone (polling workers) instead of a one-member replica set")
    p.add_argument("--no-fdb-contention", action="store_true",
                   help="skip the FoundationDB claim contention run (on the stand-in)")
    p.add_argument("--json", default="bench-results.json", help="where to write the figures (%(default)s)")
    async_rows.add_arguments(p)
    workflow_rows.add_arguments(p)
    flow_rows.add_arguments(p)
    p.add_argument("--no-otel", action="store_true", help="skip the tracing-cost rows (SQLite)")
    return p.parse_args(argv)


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = Sizes()
    if args.quick:
        sizes = Sizes(fire=1000, batch=5000, process=1000, latency=100, backlog=10_000)
    for name, attr in (("jobs", "process"), ("fire", "fire"), ("batch", "batch"), ("batch_size", "batch_size"),
                       ("latency", "latency"), ("backlog", "backlog"), ("backlog_small", "backlog_small")):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
            setattr(sizes, attr, value)
    sizes.backlog_small = min(sizes.backlog_small, sizes.backlog)
    sizes.claims = min(sizes.claims, sizes.backlog_small, sizes.backlog // 4)
    return sizes


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fmt(result: Result | None, key: str, form: str) -> str:
    if result is None or key not in result.figures:
        return "-"
    return form.format(result.figures[key])


def table(results: list[Result]) -> str:
    width = max(len(r[1]) for r in ROWS)
    cols = [max(12, len(r.system) + 1) for r in results]
    lines = [f"{'':{width}}" + "".join(f"{r.system:>{c}}" for r, c in zip(results, cols))]
    lines.append("-" * len(lines[0]))
    for key, label, form, _ in ROWS:
        if all(key not in r.figures for r in results):
            continue
        lines.append(f"{label:{width}}" + "".join(f"{fmt(r, key, form):>{c}}" for r, c in zip(results, cols)))
    lines.append(f"{'all jobs completed, right results':{width}}" +
                 "".join(f"{('yes' if r.checks and all(r.checks.values()) else 'NO'):>{c}}"
                         for r, c in zip(results, cols)))
    return "\n".join(lines)


# The peer comparison's systems that stand for a column of the main table.
PEER_OF = {"redis": "skunkqueue", "huey-redis": "huey"}


def figure(results: dict[str, Result], peer_runs: dict[str, peers.PeerRuns], system: str, key: str) -> float | None:
    """``system``'s ``key``: the median of the alternated peer rounds where they measured it, else the table's."""
    peer = peer_runs.get(PEER_OF.get(system, ""))
    if peer is not None and (median := peer.median(key)) is not None:
        return median
    r = results.get(system)
    return None if r is None else r.figures.get(key)


def ratios(results: dict[str, Result], peer_runs: dict[str, peers.PeerRuns],
           pg_peer_runs: dict[str, peers.PeerRuns] | None = None) -> dict[str, dict[str, float]]:
    """SkunkQueue / a peer, per comparable figure (>1: SkunkQueue is better): SQLite against SqliteHuey
    in the table, Redis and PostgreSQL against every peer from the medians of the alternated rounds."""
    out: dict[str, dict[str, float]] = {}
    a, b = results.get("sqlite"), results.get("huey-sqlite")
    if a is not None and b is not None:
        pair: dict[str, float] = {}
        for key in ("enqueue_fire", "process_1w"):
            if key in a.figures and key in b.figures and b.figures[key]:
                pair[key] = a.figures[key] / b.figures[key]
        for key in ("latency_p50_ms", "latency_p99_ms", "startup_s", "idle_rss_mb"):
            if key in a.figures and key in b.figures and a.figures[key]:
                pair[key] = b.figures[key] / a.figures[key]  # Huey's time / ours: >1 means we are faster
        out["sqlite vs huey-sqlite"] = pair
    for peer, per in peers.ratios(peer_runs).items():
        out[f"redis vs {peer}"] = {key: r["ratio"] for key, r in per.items()}
    for peer, per in peers.ratios(pg_peer_runs or {}).items():
        out[f"postgres vs {peer}"] = {key: r["ratio"] for key, r in per.items()}
    return out


def targets(results: dict[str, Result], rat: dict[str, dict[str, float]],
            peer_runs: dict[str, peers.PeerRuns]) -> list[dict[str, Any]]:
    """The issues' targets, each met, missed or not measured."""
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: str, ok: Callable[[float], bool]) -> None:
        rows.append({"target": name, "goal": goal, "value": value,
                     "met": None if value is None else bool(ok(value))})

    def fig(system: str, key: str) -> float | None:
        return figure(results, peer_runs, system, key)

    rh, rd = rat.get("redis vs huey", {}), rat.get("redis vs dramatiq", {})
    add("redis fire() vs Huey (issue 28)", rh.get("enqueue_fire"), ">= 1.5x", lambda v: v >= 1.5)
    add("redis processing vs Huey, 1 worker process (issue 28)", rh.get("process_1w"), ">= 2x", lambda v: v >= 2)
    add("redis idle p50 vs Huey notify_result (theirs/ours)", rh.get("latency_p50_ms"), ">= 1x",
        lambda v: v >= 1)
    add("redis fire() vs Dramatiq (issue 28)", rd.get("enqueue_fire"), ">= 1x", lambda v: v >= 1)
    add("postgres processing vs Procrastinate, 1 worker process (issue 28)",
        rat.get("postgres vs procrastinate", {}).get("process_1w"), ">= 2x", lambda v: v >= 2)
    add("redis fire_many jobs/s", fig("redis", "enqueue_batch"), ">= 50,000", lambda v: v >= 50_000)
    add("redis idle latency p50 ms", fig("redis", "latency_p50_ms"), "<= 1", lambda v: v <= 1)
    add("redis idle latency p99 ms", fig("redis", "latency_p99_ms"), "<= 3", lambda v: v <= 3)
    add("redis idle worker CPU % (no busy polling)", fig("redis", "idle_cpu_pct"), "<= 1", lambda v: v <= 1)
    add("redis backlog ratio", fig("redis", "backlog_ratio"), ">= 0.90", lambda v: v >= 0.9)
    add("redis 2 workers / 1", fig("redis", "scaling_2w"), ">= 1.7", lambda v: v >= 1.7)
    for system in BACKENDS:
        if system in results:
            add(f"{system} idle worker RSS MB", fig(system, "idle_rss_mb"), "<= 40", lambda v: v <= 40)
    if "mongodb" in results:
        add("mongodb processing, 1 worker", fig("mongodb", "process_1w"), ">= 1,000", lambda v: v >= 1000)
        per = fig("mongodb", "process_2w")
        add("mongodb processing per worker, 2 workers", None if per is None else per / 2, ">= 1,000",
            lambda v: v >= 1000)
    rs = rat.get("sqlite vs huey-sqlite", {})
    add("sqlite idle latency p50 ms", fig("sqlite", "latency_p50_ms"), "<= 1", lambda v: v <= 1)
    add("sqlite 2 workers / 1", fig("sqlite", "scaling_2w"), ">= 1.5", lambda v: v >= 1.5)
    add("sqlite processing vs SqliteHuey", rs.get("process_1w"), ">= 1x", lambda v: v >= 1)
    add("sqlite fire() vs SqliteHuey enqueue", rs.get("enqueue_fire"), ">= 1x", lambda v: v >= 1)
    add("sqlite idle latency p50 vs SqliteHuey (theirs/ours)", rs.get("latency_p50_ms"), ">= 1x",
        lambda v: v >= 1)
    return rows


# Issues 17 and 28's goals: (figure, system, Huey's system or None, key, format, goal, met?). The Redis
# figures are the medians of the alternated peer rounds (Huey with notify_result=True for p50).
GOALS: list[tuple[str, str, str | None, str, str, str, Callable[[float, float | None], bool] | None]] = [
    ("Redis fire() one by one, jobs/s", "redis", "huey-redis", "enqueue_fire", "{:,.0f}", ">= 1.5x Huey",
     lambda v, h: h is not None and v >= 1.5 * h),
    ("Redis processing, 1 worker process, jobs/s", "redis", "huey-redis", "process_1w", "{:,.0f}", ">= 2x Huey",
     lambda v, h: h is not None and v >= 2 * h),
    ("Redis idle latency fire->result p50 ms", "redis", "huey-redis", "latency_p50_ms", "{:.2f}", "<= Huey's",
     lambda v, h: h is not None and v <= h),
    ("Redis fire_many, jobs/s", "redis", None, "enqueue_batch", "{:,.0f}", ">= 50,000", lambda v, h: v >= 50_000),
    ("SQLite idle latency p50 ms", "sqlite", "huey-sqlite", "latency_p50_ms", "{:.2f}", "<= 1 ms",
     lambda v, h: v <= 1),
    ("SQLite 2 workers / 1 worker", "sqlite", None, "scaling_2w", "{:.2f}x", ">= 1.5x", lambda v, h: v >= 1.5),
    ("Mongo processing, 1 worker, jobs/s", "mongodb", None, "process_1w", "{:,.0f}", ">= 1,000",
     lambda v, h: v >= 1000),
    ("Redis worker start-up, launch->first result s", "redis", "huey-redis", "startup_s", "{:.2f}", "-", None),
    ("SQLite worker start-up, launch->first result s", "sqlite", "huey-sqlite", "startup_s", "{:.2f}", "-", None),
]


def goals_table(results: dict[str, Result], peer_runs: dict[str, peers.PeerRuns]) -> str:
    """Each goal's figure next to Huey's in the same run, the ratio, the goal and whether it is met."""
    head = ("figure", "SkunkQueue", "Huey", "ratio", "goal", "")
    rows: list[tuple[str, ...]] = []
    for label, ours, theirs, key, form, goal, ok in GOALS:
        mine = figure(results, peer_runs, ours, key)
        huey = figure(results, peer_runs, theirs, key) if theirs else None
        if mine is None:
            rows.append((label, "-", "-" if huey is None else form.format(huey), "-", goal, "not measured"))
            continue
        lower_is_better = key in ("latency_p50_ms", "startup_s")
        ratio = "-"
        if huey:
            ratio = f"{(huey / mine if lower_is_better else mine / huey):.2f}x"
        status = "" if ok is None else ("met" if ok(mine, huey) else "MISSED")
        rows.append((label, form.format(mine), "-" if huey is None else form.format(huey), ratio, goal, status))
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    lines = ["  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(r, widths)))
             for r in (head, *rows)]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines) + "\n(ratio > 1: SkunkQueue better; for times it is Huey's time / ours)"


def _format_target(row: dict[str, Any]) -> str:
    status = {True: "met", False: "MISSED", None: "not measured"}[row["met"]]
    value = "-" if row["value"] is None else f"{row['value']:,.2f}"
    return f"  {row['target']:52} {value:>12}  (goal {row['goal']}): {status}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sizes_from(args)
    compile_sources()
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in wanted if b not in BACKENDS]
    if unknown:
        raise SystemExit(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    installed = {entry.name for entry in registry.installed()}
    workdir = Path(tempfile.mkdtemp(prefix="skunqbench-"))
    results: dict[str, Result] = {}
    skipped: dict[str, str] = {}
    peer_runs: dict[str, peers.PeerRuns] = {}
    pg_peer_runs: dict[str, peers.PeerRuns] = {}
    started = time.time()
    log(f"benchmark sizes: {sizes}; scratch directory {workdir}")
    try:
        for name in wanted:
            if name not in installed:
                skipped[name] = "backend not installed"
                continue
            results[name] = Result(name)
            if name == "sqlite":
                target = skunk.Target("sqlite", url=str(workdir / "skunq.db"), logdir=workdir,
                                      prefetch=args.prefetch)
                skunk.run(target, sizes, results[name], log)
                async_rows.run(target, args, results[name], log)
                workflow_rows.run(target, args, results[name], log)
                flow_rows.run(target, args, results[name], log)
                if otel_cost is not None:
                    otel_cost.run(args, results[name], log, jobs_n=min(1000, sizes.fire))
                if not args.no_huey and huey_bench.available():
                    results["huey-sqlite"] = Result("huey-sqlite")
                    huey_bench.run(huey_bench.HueyTarget("sqlite", str(workdir / "huey.db"), workdir),
                                   sizes, results["huey-sqlite"], log)
                continue
            server_cls: type[Server] = {"redis": RedisServer, "mongodb": MongoServer, "postgres": PostgresServer}[name]
            if not server_cls.available():  # type: ignore[attr-defined]
                skipped[name] = f"no {server_cls.name} binary"
                del results[name]
                continue
            server: Server = (MongoServer(replset=not args.mongo_standalone) if name == "mongodb"
                              else server_cls())
            log(f"starting {server.name} on 127.0.0.1:{server.port}")
            with server:
                reset = server.flush if isinstance(server, RedisServer) else None
                db = "skunqbench" if name == "mongodb" else None
                target = skunk.Target(name, url=server.url, db=db, logdir=workdir, reset=reset,
                                      prefetch=args.prefetch)
                if name == "mongodb":
                    results[name].notes.append("mongod " + ("standalone" if args.mongo_standalone
                                                            else "one-member replica set (change streams)"))
                skunk.run(target, sizes, results[name], log)
                async_rows.run(target, args, results[name], log)
                workflow_rows.run(target, args, results[name], log)
                flow_rows.run(target, args, results[name], log)
                if isinstance(server, RedisServer) and not (args.no_huey or args.no_async) and huey_bench.available():
                    server.flush()
                    results["huey-redis"] = Result("huey-redis")
                    async_rows.run_huey(server.url, args, results["huey-redis"], workdir, log)
                if isinstance(server, RedisServer) and not args.no_peers:
                    spec = ",".join(n for n in args.peers.split(",") if not (args.no_huey and n.strip() == "huey"))
                    names, skipped_peers = peers.wanted(spec, log)
                    skipped.update({f"peer {k}": v for k, v in skipped_peers.items()})
                    server.flush()
                    peer_runs = peers.run(server.url, server.flush, sizes, peers.rounds_from(args), names,
                                          workdir, log)
                if isinstance(server, PostgresServer) and not args.no_peers:
                    names, skipped_peers = peers.wanted(args.pg_peers, log, "postgres")
                    skipped.update({f"peer {k}": v for k, v in skipped_peers.items()})
                    pg_peer_runs = peers.run(server.database_url(peers.PG_DATABASE),
                                             partial(server.recreate, peers.PG_DATABASE), sizes,
                                             peers.rounds_from(args), names, workdir, log)
        for r in results.values():
            if "process_1w" in r.figures and "process_2w" in r.figures:
                r.figures["scaling_2w"] = r.figures["process_2w"] / r.figures["process_1w"]
        order = [n for n in (*BACKENDS, "huey-redis", "huey-sqlite") if n in results]
        ordered = [results[n] for n in order]
        rat = ratios(results, peer_runs, pg_peer_runs)
        goals = targets(results, rat, peer_runs)
        rounds = peers.rounds_from(args)
        print(table(ordered))
        if peer_runs:
            print("(redis's fire, processing, latency, start-up and RSS against the peers: the alternated rounds "
                  "below, which the goals use; the column above is one run)")
        if "sqlite vs huey-sqlite" in rat:
            print("\nSkunkQueue sqlite vs huey-sqlite (x > 1: SkunkQueue better): " +
                  ", ".join(f"{k} {v:.2f}x" for k, v in rat["sqlite vs huey-sqlite"].items()))
        for runs in (peer_runs, pg_peer_runs):
            if runs:
                print("\n" + peers.table(runs, rounds))
                print(peers.setups(list(runs)))
        print("\nThe issues' goals (17 and 28), Huey in this run" +
              (" (Redis: medians of the alternated rounds):" if peer_runs else ":"))
        print(goals_table(results, peer_runs))
        print("\nTargets:")
        for row in goals:
            if row["met"] is not None or row["target"].startswith(("redis", "mongodb", "postgres")):
                print(_format_target(row))
        for name, why in skipped.items():
            print(f"(skipped {name}: {why})")
        failures = [f"{r.system}: {e}" for r in ordered for e in r.errors]
        failures += [f"peer {name}: {e}" for runs in (peer_runs, pg_peer_runs) for name, r in runs.items()
                     for e in r.errors]
        for failure in failures:
            print(f"CHECK FAILED {failure}")
        report = {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "seconds": round(time.time() - started, 1),
            "machine": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus": os.cpu_count()},
            "sizes": sizes.__dict__,
            "prefetch": args.prefetch,
            "results": {r.system: r.to_json() for r in ordered},
            "ratios": rat,
            "peers": peers.to_json(peer_runs, rounds) if peer_runs else None,
            "peers_postgres": peers.to_json(pg_peer_runs, rounds) if pg_peer_runs else None,
            "targets": goals,
            "skipped": skipped,
            "all_checks_passed": not failures,
        }
        if not args.no_fdb_contention:
            report["fdb_contention"] = fdb_contention.run_in_child(args.quick, log)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        log(f"figures written to {args.json}")
        if failures:
            log(f"worker logs kept in {workdir}")
            return 1
    finally:
        if not any(r.errors for r in results.values()) and not any(
                r.errors for runs in (peer_runs, pg_peer_runs) for r in runs.values()):
            shutil.rmtree(workdir, ignore_errors=True)
    return 0
