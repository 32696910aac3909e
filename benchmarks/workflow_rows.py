"""The workflow row of ``make bench`` (issue 24): a 10,000-member group and its callback against
10,000 independent jobs, each pre-enqueued and then run by one pool of 2 workers.

The issue's goal: the group and its callback finish within 1.5x the time of the independent jobs
(on Redis). Timed from the pool's start to the last result (the callback's, for the group).
Run alone: ``python -m benchmarks.workflow_rows [--backends sqlite,redis,postgres] [--members N]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks import jobs
from benchmarks.common import BenchError, Result, stop_process, wait_until
from skunkqueue import COMPLETE, group

ROWS = [
    ("group10k_s", "10,000-member group + callback, 2 workers (s)", "{:.1f}", False),
    ("independent10k_s", "10,000 independent jobs, 2 workers (s)", "{:.1f}", False),
    ("group10k_ratio", "... group / independent (goal <= 1.5)", "{:.2f}", False),
]
MEMBERS = 10_000
WORKERS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-workflows", action="store_true", help="skip the workflow row")
    parser.add_argument("--members", type=int, default=None,
                        help=f"members of the workflow row's group, and independent jobs beside it "
                             f"(default {MEMBERS:,}; the rows keep their 10k names)")


def _timed(target: Any, fire: Callable[[Any], Callable[[], bool]]) -> float:
    """Seconds from starting a pool to ``done()``, for the jobs ``fire(job)`` enqueued first."""
    queue = target.queue("workflow")
    try:
        done = fire(queue)
        pool = target.start_workers(queue, "bench", WORKERS)
        try:
            started = time.monotonic()
            finished = wait_until(lambda: pool.poll() is None and done(), 900, "the jobs to finish", pause=0.01)
            if pool.poll() is not None:
                raise BenchError(f"the pool exited with {pool.returncode}")
        finally:
            stop_process(pool)
        return finished - started
    finally:
        queue.close()


def run(target: Any, args: argparse.Namespace, result: Result, log: Callable[[str], None],
        members: int | None = None) -> None:
    if getattr(args, "no_workflows", False):
        return
    members = members or getattr(args, "members", None) or MEMBERS
    if members < 1:
        raise SystemExit("--members must be at least 1")
    probe = target.queue("workflow-probe")
    try:
        if not probe.persistence.supports_workflows:
            result.notes.append(f"workflow row: the {target.backend} backend does not support workflows")
            return
    finally:
        probe.close()
    log(f"  {result.system}: {members} independent jobs")

    def independent(queue: Any) -> Callable[[], bool]:
        noop = jobs.bind(queue, jobs.noop, "bench")
        for start in range(0, members, 1000):
            noop.fire_many([(i,) for i in range(start, min(members, start + 1000))])
        return lambda: queue.counts().get(("bench", COMPLETE), 0) >= members

    log(f"  {result.system}: a {members}-member group and its callback")
    checked: list[bool] = []

    def chord(queue: Any) -> Callable[[], bool]:
        noop, count = jobs.bind(queue, jobs.noop, "bench"), jobs.bind(queue, jobs.count, "bench")
        handle = group(noop.s(i) for i in range(members)).then(count.s()).fire()
        last = handle.jobs[-1]

        def done() -> bool:
            # The counts, not the callback's record: it names all 10,000 parents, and reading it
            # every 10 ms would load the store more than the workers do.
            if queue.counts().get(("bench", COMPLETE), 0) < members + 1:
                return False
            checked.append(last.result == members)
            return True
        return done

    try:
        alone = _timed(target, independent)
        together = _timed(target, chord)
    except Exception as exc:  # keep going: the other rows still say something
        result.check("workflow", False, f"{type(exc).__name__}: {exc}")
        return
    result.check("group10k_callback", all(checked), "the callback was not given every member's result")
    result.figures.update(group10k_s=together, independent10k_s=alone, group10k_ratio=together / alone)
    result.notes.append(f"workflow row: {members} members, one pool of {WORKERS} workers, "
                        "each run's jobs enqueued before the pool starts")


def main(argv: list[str] | None = None) -> int:
    from benchmarks import skunk
    from benchmarks.servers import PostgresServer, RedisServer

    parser = argparse.ArgumentParser(prog="python -m benchmarks.workflow_rows", description=__doc__)
    parser.add_argument("--backends", default="sqlite,redis")
    parser.add_argument("--members", type=int, default=MEMBERS)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="skunqbench-wf-"))

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    for name in args.backends.split(","):
        result = Result(name)
        if name == "sqlite":
            run(skunk.Target("sqlite", url=str(workdir / "wf.db"), logdir=workdir, log_level="WARNING"),
                args, result, log, args.members)
        elif name in ("redis", "postgres"):
            with (RedisServer() if name == "redis" else PostgresServer()) as server:
                run(skunk.Target(name, url=server.url, logdir=workdir, log_level="WARNING"), args, result, log,
                    args.members)
        else:
            raise SystemExit(f"unknown backend {name}")
        figures = ", ".join(f"{key} {result.figures[key]:.2f}" for key, *_ in ROWS if key in result.figures)
        print(f"{name}: {figures} {result.errors or ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
