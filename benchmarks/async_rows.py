"""The asyncio rows of ``make bench`` (issue 16), on one worker process each.

* 200 ``async def`` jobs that each ``await asyncio.sleep(0.5)``, with
  ``--async-concurrency 50`` and with 1. The 1 case is sampled: 20 jobs are
  timed and the figure is scaled to 200 (a sequential run of 200 would take
  about 100 s per backend and say nothing more).
* Throughput of 10 ms I/O-bound jobs (a sleep standing for a network call):
  SkunkQueue async jobs (``--async-concurrency 50``), SkunkQueue sync jobs
  (one at a time, as sync jobs run) and, on the same Redis, Huey's consumer
  with 50 greenlet workers (gevent, ``time.sleep`` patched) and with 50 thread
  workers - each one process. arq is not measured: arq 0.28 requires
  redis-py < 6 and SkunkQueue's environment has redis-py 8, so the two cannot
  be installed side by side.

Workers import this module (``--import benchmarks.async_rows``) to find the jobs,
and ``huey_consumer benchmarks.async_rows.huey`` to find the Huey task.
"""

# A greenlet consumer must patch the standard library before anything else imports it, hence the order below.
from __future__ import annotations

import os

if os.environ.get("SKUNQ_BENCH_HUEY_GEVENT"):  # set for huey_consumer -k greenlet only
    from gevent import monkey

    monkey.patch_all()

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import ROOT, BenchError, Result, rate, stop_process, wait_until
from skunkqueue import COMPLETE, PENDING, Job, SkunkQueue
from skunkqueue.testing.kit import kit_env, kit_queue, kit_routes

# (key, label, format, higher is better), appended to run.py's ROWS.
ROWS = [
    ("async_sleep_c50_s", "200 async jobs x 0.5 s sleep, --async-concurrency 50 (s)", "{:.1f}", False),
    ("async_sleep_c1_s", "... with --async-concurrency 1 (s, 20 timed, x10)", "{:.1f}", False),
    ("io10_async", "10 ms I/O jobs, 1 process: async, 50 at once (jobs/s)", "{:,.0f}", True),
    ("io10_sync", "10 ms I/O jobs, 1 process: sync (jobs/s)", "{:,.0f}", True),
    ("io10_huey_greenlet", "10 ms I/O jobs, 1 process: 50 greenlets (jobs/s)", "{:,.0f}", True),
    ("io10_huey_thread", "10 ms I/O jobs, 1 process: 50 threads (jobs/s)", "{:,.0f}", True),
]
SLEEP_JOBS, SLEEP_SECONDS, SLEEP_SAMPLE = 200, 0.5, 20
IO_SECONDS = 0.01
CONCURRENCY = 50

_declared = kit_queue("skunkqueue-bench-async")
_routes = kit_routes(["async"])


@_declared.event(routes=_routes)
async def asleep(i: int, seconds: float) -> int:
    """Awaits a sleep (an I/O wait that yields the loop), hands its argument back."""
    await asyncio.sleep(seconds)
    return i


@_declared.event(routes=_routes)
def sleep_sync(i: int, seconds: float) -> int:
    """The same wait, blocking: how a sync job waits for I/O."""
    time.sleep(seconds)
    return i


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-async", action="store_true", help="skip the asyncio rows")


def _io_jobs(args: argparse.Namespace) -> tuple[int, int]:
    """(async or Huey jobs, sync jobs) for the 10 ms throughput rows: a few seconds each
    (fewer with --quick, and never more than --jobs)."""
    many = 600 if getattr(args, "quick", False) else 3000
    if getattr(args, "jobs", None):
        many = min(many, args.jobs)
    return many, max(10, many // 10)


def _start_worker(target: Any, queue: SkunkQueue, route: str, concurrency: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "skunkqueue.cli", "work", "-q", queue.name, "-r", route, "-c", "1",
           "--async-concurrency", str(concurrency), "--backend", target.backend, "--path", str(ROOT),
           "--import", "benchmarks.async_rows", "--log-level", "WARNING"]
    if target.url:
        cmd += ["--url", target.url]
    if target.db:
        cmd += ["--db", target.db]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKUNQ_")}
    env.update(kit_env(queue.name, [route]))
    with open(target.logdir / f"workers-async-{target.backend}.log", "ab") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def _timed_run(target: Any, result: Result, name: str, func: Any, calls: list[tuple[Any, ...]],
               concurrency: int) -> float:
    """Enqueue ``calls`` (async, through afire_many), start one worker process, return seconds from
    the first claim to the last result; checks that every job completed with its own argument."""
    queue = target.queue(f"async-{name}")
    route = "async"
    try:
        job = Job(queue, func, [route])

        async def fire() -> list[str]:
            return [h.id for h in await job.afire_many(calls)]

        ids = asyncio.run(fire())
        backend = queue.persistence
        pool = _start_worker(target, queue, route, concurrency)
        try:
            def started() -> bool:
                if pool.poll() is not None:
                    raise BenchError(f"the worker exited with {pool.returncode}")
                record = backend.get(ids[0])
                return record is not None and record.state != PENDING

            t0 = wait_until(started, 300, "the first async job to be claimed", pause=0.005)
            t1 = wait_until(lambda: queue.counts().get((route, COMPLETE), 0) >= len(ids), 600,
                            f"{len(ids)} jobs to finish", pause=0.01)
        finally:
            stop_process(pool)
        wrong = [i for i, job_id in enumerate(ids) if (r := queue.get(job_id)) is None or r.state != COMPLETE]
        result.check(f"{name}_complete", not wrong, f"{len(wrong)} of {len(ids)} jobs not complete")
        queue.purge(route)
        return t1 - t0
    finally:
        queue.close()


def run(target: Any, args: argparse.Namespace, result: Result, log: Callable[[str], None]) -> None:
    """The SkunkQueue async rows on one backend (``target`` is a ``skunk.Target``)."""
    if getattr(args, "no_async", False):
        return
    many, few = _io_jobs(args)
    steps: list[tuple[str, Callable[[], None]]] = [
        ("async sleep, --async-concurrency 50", lambda: result.figures.__setitem__(
            "async_sleep_c50_s", _timed_run(target, result, "sleep_c50", asleep.func,
                                            [(i, SLEEP_SECONDS) for i in range(SLEEP_JOBS)], CONCURRENCY))),
        ("async sleep, --async-concurrency 1 (sampled)", lambda: result.figures.__setitem__(
            "async_sleep_c1_s", SLEEP_JOBS / SLEEP_SAMPLE * _timed_run(
                target, result, "sleep_c1", asleep.func, [(i, SLEEP_SECONDS) for i in range(SLEEP_SAMPLE)], 1))),
        ("10 ms I/O jobs, async", lambda: result.figures.__setitem__(
            "io10_async", rate(many, _timed_run(target, result, "io10_async", asleep.func,
                                                [(i, IO_SECONDS) for i in range(many)], CONCURRENCY)))),
        ("10 ms I/O jobs, sync", lambda: result.figures.__setitem__(
            "io10_sync", rate(few, _timed_run(target, result, "io10_sync", sleep_sync.func,
                                              [(i, IO_SECONDS) for i in range(few)], 1)))),
    ]
    result.notes.append(f"async rows: one worker process; sleep rows {SLEEP_JOBS} jobs x {SLEEP_SECONDS} s "
                        f"(the --async-concurrency 1 row times {SLEEP_SAMPLE} and scales to {SLEEP_JOBS}); "
                        f"10 ms rows {many} async / {few} sync jobs")
    for name, step in steps:
        log(f"  {result.system}: {name}")
        try:
            step()
        except Exception as exc:  # keep going: the other rows still say something
            result.check(name, False, f"{type(exc).__name__}: {exc}")
        if target.reset:
            target.reset()


# -- Huey, the same 10 ms jobs ---------------------------------------------------------

def _huey_io(i: int, seconds: float) -> int:
    time.sleep(seconds)  # patched by gevent in a greenlet consumer, so it yields
    return i


def make_huey(url: str) -> tuple[Any, Any]:
    from huey import RedisHuey

    huey = RedisHuey("skunqbench-io", url=url)
    return huey, huey.task(name="io")(_huey_io)


huey: Any = None
if os.environ.get("SKUNQ_BENCH_HUEY_IO"):
    huey, _task = make_huey(os.environ["SKUNQ_BENCH_HUEY_IO"])


def gevent_available() -> bool:
    try:
        import gevent  # noqa: F401
    except ImportError:
        return False
    return True


def _huey_rate(url: str, kind: str, jobs: int, logdir: Path) -> float:
    instance, task = make_huey(url)
    instance.flush()
    handles = [task(i, IO_SECONDS) for i in range(jobs)]
    local = Path(sys.executable).parent / "huey_consumer"
    binary = str(local) if local.exists() else (shutil.which("huey_consumer") or "huey_consumer")
    env = dict(os.environ, SKUNQ_BENCH_HUEY_IO=url, SKUNQ_BENCH_HUEY_GEVENT="1" if kind == "greenlet" else "",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [binary, "benchmarks.async_rows.huey", "-w", str(CONCURRENCY), "-k", kind, "-q"]
    with open(logdir / f"huey-io-{kind}.log", "ab") as log:
        consumer = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
    try:
        def started() -> bool:
            if consumer.poll() is not None:
                raise BenchError(f"huey_consumer -k {kind} exited with {consumer.returncode}")
            return bool(instance.pending_count() < jobs)

        t0 = wait_until(started, 300, "huey to take the first task", pause=0.005)
        t1 = wait_until(lambda: instance.result_count() >= jobs, 600, "every huey result", pause=0.01)
    finally:
        import signal

        stop_process(consumer, signal.SIGINT)
    wrong = sum(1 for i, h in enumerate(handles) if h.get(preserve=True) != i)
    instance.flush()
    if wrong:
        raise BenchError(f"{wrong} of {jobs} huey tasks without the right result")
    return rate(jobs, t1 - t0)


def run_huey(url: str, args: argparse.Namespace, result: Result, logdir: Path,
             log: Callable[[str], None]) -> None:
    """Huey's rows next to ``redis``: 50 greenlet workers, then 50 thread workers, in one consumer process."""
    if getattr(args, "no_async", False):
        return
    many, _ = _io_jobs(args)
    kinds = [("greenlet", "io10_huey_greenlet"), ("thread", "io10_huey_thread")]
    if not gevent_available():
        result.notes.append("greenlet row skipped: gevent is not installed")
        kinds = kinds[1:]
    for kind, key in kinds:
        log(f"  {result.system}: 10 ms I/O jobs, {CONCURRENCY} {kind} workers")
        try:
            result.figures[key] = _huey_rate(url, kind, many, logdir)
            result.check(f"io10_huey_{kind}", True)  # _huey_rate checked every task's result
        except Exception as exc:
            result.check(f"io10_huey_{kind}", False, f"{type(exc).__name__}: {exc}")
    result.notes.append(f"async rows: huey_consumer -w {CONCURRENCY} -k greenlet|thread, {many} tasks of "
                        "time.sleep(0.01); arq not measured (it requires redis-py < 6)")
