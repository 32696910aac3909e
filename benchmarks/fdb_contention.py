"""FoundationDB claim contention: claims/s and conflict retries per job for 1, 4, 16, 32 claimers.

Runs on the FoundationDB STAND-IN (tests/fdb_standin, not a real FoundationDB)
with emulated per-request and per-commit latency, because no FoundationDB can
be installed where this runs. What it measures is the backend's design under
optimistic concurrency: how many claims conflict and are retried when N
claimers take from one route at once. Claimers are threads of one process,
each with its own connection, so they overlap while they wait on latency.

``python -m benchmarks.fdb_contention [--claimers 1,4,16,32] [--seconds 3]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

LABEL = "fdb stand-in (not a real FoundationDB)"


def _activate_standin() -> Any:
    from benchmarks.servers import fdb_servers

    fdb_servers.activate_standin()
    from fdb.standin_faults import FAULTS

    return FAULTS


def _record(queue: str, route: str, n: int) -> Any:
    from skunkqueue.record import JobRecord, new_id

    now = time.time() - 1
    return JobRecord(id=new_id(), queue=queue, route=route, func="benchmarks.jobs:noop", payload=b"[[],{}]",
                     due=now, created=now + n * 1e-6)


def measure(cluster_file: str, claimers: int, seconds: float, faults: Any, latency: tuple[float, float],
            log: Callable[[str], None], *, shared: bool = True) -> dict[str, float]:
    """Claims/s of ``claimers`` on one route, or (``shared=False``) each on a route of its own:
    the harness's ceiling on this machine, where no two claimers can conflict."""
    from skunkqueue_fdb.persistence import FDBPersistence

    queue = f"contention-{uuid.uuid4().hex[:8]}"
    store = FDBPersistence(queue, url=cluster_file, db="skunqbench")
    # Enough backlog that no claimer runs dry: about 150 claims/s per claimer at most.
    backlog = int(max(1000, claimers * seconds * 150))
    faults.request_latency = faults.commit_latency = 0.0
    routes = ["r"] if shared else [f"r{i}" for i in range(claimers)]
    for start in range(0, backlog, 1000):
        store.enqueue([_record(queue, routes[n % len(routes)], n) for n in range(start, min(backlog, start + 1000))])
    faults.request_latency, faults.commit_latency = latency
    claimed = [0] * claimers
    stop = threading.Event()
    ready = threading.Barrier(claimers + 1)

    def claimer(i: int) -> None:
        store.counts()  # open this thread's connection before the clock starts
        ready.wait()
        while not stop.is_set():
            got = store.claim(routes[i % len(routes)], f"w{i}", 60)
            claimed[i] += len(got)
            if not got:
                break

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(claimers)]
    for t in threads:
        t.start()
    ready.wait()
    before = dict(faults.stats)
    started = time.monotonic()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    conflicts = faults.stats["conflicts"] - before["conflicts"]
    total = sum(claimed)
    faults.request_latency = faults.commit_latency = 0.0
    counts = store.counts()
    store.close()
    if sum(n for (_route, state), n in counts.items() if state == "running") != total:
        raise RuntimeError(f"{claimers} claimers: claimed {total} but {counts} are stored")
    result = {"claimers": claimers, "claims_per_s": total / elapsed, "retries_per_job": conflicts / max(total, 1),
              "claims": total}
    log(f"fdb contention: {claimers:>2} claimers{'' if shared else ' (own routes)'} "
        f"{result['claims_per_s']:8.1f} claims/s {result['retries_per_job']:.3f} conflict retries/job")
    return result


def measure_idle(cluster_file: str, workers: int, jobs: int, faults: Any, latency: tuple[float, float],
                 log: Callable[[str], None]) -> dict[str, float]:
    """Idle workers, one job at a time (every 50 ms): conflict retries and requests per job.

    Each worker loops as ``skunq work`` does: claim, and when nothing came, wait for work.
    """
    from skunkqueue_fdb.persistence import FDBPersistence

    queue = f"idle-{uuid.uuid4().hex[:8]}"
    store = FDBPersistence(queue, url=cluster_file, db="skunqbench")
    faults.request_latency, faults.commit_latency = latency
    claimed = [0]
    stop = threading.Event()

    def worker(i: int) -> None:
        while not stop.is_set():
            got = store.claim("r", f"w{i}", 60)
            claimed[0] += len(got)
            if not got:
                store.wait_for_work("r", f"w{i}", 1.0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    time.sleep(1.5)  # all idle
    before = dict(faults.stats)
    for n in range(jobs):
        store.enqueue([_record(queue, "r", n)])
        time.sleep(0.05)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    faults.request_latency = faults.commit_latency = 0.0
    store.close()
    if claimed[0] != jobs:
        raise RuntimeError(f"{workers} idle workers claimed {claimed[0]} of {jobs} jobs")
    result = {"workers": workers, "retries_per_job": (faults.stats["conflicts"] - before["conflicts"]) / jobs,
              "requests_per_job": (faults.stats["requests"] - before["requests"]) / jobs}
    log(f"fdb idle wake-ups: {workers:>2} idle workers {result['retries_per_job']:.2f} conflict retries/job "
        f"{result['requests_per_job']:.1f} requests/job")
    return result


def run(claimers: list[int], seconds: float, request_ms: float, commit_ms: float,
        log: Callable[[str], None], idle: list[int] | None = None) -> tuple[list[dict[str, float]],
                                                                       list[dict[str, float]]]:
    faults = _activate_standin()
    # Claimer threads wake from their emulated latency at once; a short GIL switch
    # interval keeps them from queueing behind each other for 5 ms each (a harness cost).
    sys.setswitchinterval(0.0005)
    from benchmarks.servers import fdb_servers

    cluster = fdb_servers.StandInCluster(Path(tempfile.mkdtemp(prefix="skunqbench-fdb-"))).start()
    try:
        cluster_file = cluster.cluster_file
        latency = (request_ms / 1000, commit_ms / 1000)
        results = []
        for n in claimers:
            result = measure(cluster_file, n, seconds, faults, latency, log)
            result["ceiling_per_s"] = measure(cluster_file, n, seconds, faults, latency, log,
                                              shared=False)["claims_per_s"]
            results.append(result)
        idles = [measure_idle(cluster_file, n, 40, faults, latency, log) for n in (idle or [])]
        return results, idles
    finally:
        cluster.stop()


def table(results: list[dict[str, float]], request_ms: float, commit_ms: float,
          idles: list[dict[str, float]] | None = None) -> str:
    lines = [f"FoundationDB claim contention on the {LABEL}, "
             f"{request_ms} ms per request + {commit_ms} ms per commit",
             f"{'claimers':>9} {'claims/s':>10} {'retries/job':>12} {'ceiling/s':>10}  "
             "(ceiling: each claimer on a route of its own, no conflicts possible)"]
    lines += [f"{r['claimers']:>9} {r['claims_per_s']:>10.1f} {r['retries_per_job']:>12.3f} "
              f"{r['ceiling_per_s']:>10.1f}" for r in results]
    if idles:
        lines += ["", "idle workers, one job every 50 ms",
                  f"{'workers':>9} {'retries/job':>12} {'requests/job':>13}"]
        lines += [f"{r['workers']:>9} {r['retries_per_job']:>12.2f} {r['requests_per_job']:>13.1f}" for r in idles]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fdb_contention", description=__doc__.split("\n")[0])
    p.add_argument("--claimers", default="1,4,16,32", help="claimer counts to run (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per run (default: %(default)s)")
    p.add_argument("--request-ms", type=float, default=1.0, help="latency per request (default: %(default)s)")
    p.add_argument("--commit-ms", type=float, default=1.0, help="extra latency per commit (default: %(default)s)")
    p.add_argument("--idle", default="1,4,16", help="idle worker counts for the wake-up run ('' to skip; "
                                                    "default: %(default)s)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    try:
        counts = [int(n) for n in args.claimers.split(",")]
        idle = [int(n) for n in args.idle.split(",") if n.strip()]
    except ValueError:
        raise SystemExit("--claimers and --idle take numbers separated by commas") from None
    results, idles = run(counts, args.seconds, args.request_ms, args.commit_ms,
                         lambda m: print(m, file=sys.stderr, flush=True), idle)
    print(table(results, args.request_ms, args.commit_ms, idles))
    if args.json:
        Path(args.json).write_text(json.dumps({"label": LABEL, "request_ms": args.request_ms,
                                               "commit_ms": args.commit_ms, "seconds": args.seconds,
                                               "results": results, "idle": idles}, indent=2) + "\n")
    return 0


def run_in_child(quick: bool, log: Callable[[str], None]) -> dict[str, Any] | None:
    """For ``make bench``: run in a process of its own (it must import the stand-in ``fdb``), print the table."""
    with tempfile.TemporaryDirectory(prefix="skunqbench-fdbc-") as work:
        out = Path(work) / "fdb-contention.json"
        log("fdb claim contention on the stand-in (skip with --no-fdb-contention)")
        done = subprocess.run([sys.executable, "-m", "benchmarks.fdb_contention", "--json", str(out),
                               "--seconds", "1" if quick else "3"], stdout=subprocess.PIPE, text=True)
        print("\n" + done.stdout.rstrip())
        if done.returncode != 0 or not out.exists():
            log(f"fdb claim contention failed (exit {done.returncode})")
            return None
        figures: dict[str, Any] = json.loads(out.read_text())
        return figures


if __name__ == "__main__":
    sys.exit(main())
