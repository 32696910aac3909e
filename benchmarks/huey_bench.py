"""The same workloads on Huey (SqliteHuey in ``make bench``; RedisHuey is in ``benchmarks.peers``), one
``huey_consumer -w 1 -k thread`` (its defaults), Huey's default set-up (no ``notify_result``)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

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
from benchmarks.huey_app import make_huey


def available() -> bool:
    try:
        import huey  # noqa: F401
    except ImportError:
        return False
    return True


def _consumer_binary() -> str:
    local = Path(sys.executable).parent / "huey_consumer"
    return str(local) if local.exists() else (shutil.which("huey_consumer") or "huey_consumer")


class HueyTarget:
    def __init__(self, kind: str, where: str, logdir: Path) -> None:
        self.kind, self.where, self.logdir = kind, where, logdir

    def open(self) -> tuple[Any, Any]:
        huey, task = make_huey(self.kind, self.where)
        huey.flush()
        return huey, task

    def start_consumer(self) -> subprocess.Popen[bytes]:
        # Huey's default logging (INFO, a line per task), as SkunkQueue's workers run at theirs.
        cmd = [_consumer_binary(), "benchmarks.huey_app.huey", "-w", "1", "-k", "thread"]
        if self.kind == "sqlite":
            # Poll the way a SkunkQueue worker polls SQLite: from 1 ms, doubling, at most 200 ms.
            cmd += ["-d", "0.001", "-b", "2", "-m", "0.2"]
        env = dict(os.environ, SKUNQ_BENCH_HUEY=self.kind, SKUNQ_BENCH_HUEY_WHERE=self.where,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        with open(self.logdir / f"huey-{self.kind}.log", "ab") as log:
            return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)

    def stop_consumer(self, process: subprocess.Popen[bytes]) -> None:
        stop_process(process, signal.SIGINT)  # huey's graceful signal

    def log_tail(self) -> str:
        path = self.logdir / f"huey-{self.kind}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def enqueue(target: HueyTarget, sizes: Sizes, result: Result) -> None:
    huey, task = target.open()
    task(-1)
    start = time.perf_counter()
    for i in range(sizes.fire):
        task(i)
    result.figures["enqueue_fire"] = rate(sizes.fire, time.perf_counter() - start)
    pending = huey.pending_count()
    result.check("enqueue_stored", pending == sizes.fire + 1, f"{pending} pending")
    huey.flush()


def processing(target: HueyTarget, sizes: Sizes, result: Result) -> None:
    huey, task = target.open()
    handles = [task(i) for i in range(sizes.process)]
    storage = huey.storage
    last = handles[-1].id
    consumer = target.start_consumer()
    try:
        def started() -> bool:
            if consumer.poll() is not None:
                raise BenchError(f"huey_consumer exited with {consumer.returncode}:\n{target.log_tail()}")
            return bool(huey.pending_count() < sizes.process)

        t0 = wait_until(started, sizes.timeout, "huey to take the first task")
        wait_until(lambda: storage.has_data_for_key(last), sizes.timeout, "huey's last result")
        t1 = wait_until(lambda: huey.result_count() >= sizes.process, sizes.timeout, "every huey result")
    finally:
        target.stop_consumer(consumer)
    result.figures["process_1w"] = rate(sizes.process, t1 - t0)
    wrong = sum(1 for i, h in enumerate(handles) if h.get(preserve=True) != i)
    result.check("process_1w_complete", wrong == 0, f"{wrong} of {sizes.process} tasks without the right result")
    huey.flush()


def latency(target: HueyTarget, sizes: Sizes, result: Result) -> None:
    huey, task = target.open()
    consumer = target.start_consumer()
    try:
        for i in range(5):
            task(i).get(blocking=True, timeout=60)
        samples, wrong = [], 0
        for i in range(sizes.latency):
            time.sleep(sizes.latency_gap)
            start = time.perf_counter()
            value = task(i).get(blocking=True, timeout=30)
            samples.append(time.perf_counter() - start)
            wrong += value != i
        result.check("latency_results", wrong == 0, f"{wrong} wrong results")
        result.figures["latency_p50_ms"] = 1000 * percentile(samples, 50)
        result.figures["latency_p99_ms"] = 1000 * percentile(samples, 99)
        time.sleep(1.0)
        result.figures["idle_rss_mb"] = rss_mb(consumer.pid)
        result.figures["idle_cpu_pct"] = idle_cpu_percent(consumer.pid)
    finally:
        target.stop_consumer(consumer)
    huey.flush()


def _launch_to_result(target: HueyTarget, handle: Any, timeout: float) -> float:
    """Start the consumer; seconds until ``handle``'s result is there."""
    start = time.perf_counter()
    consumer = target.start_consumer()
    try:
        def done() -> bool:
            if consumer.poll() is not None:
                raise BenchError(f"huey_consumer exited with {consumer.returncode}:\n{target.log_tail()}")
            return handle.get(preserve=True) is not None

        wait_until(done, timeout, "huey's first result")
        return time.perf_counter() - start
    finally:
        target.stop_consumer(consumer)


def startup(target: HueyTarget, sizes: Sizes, result: Result, repeats: int = 3) -> None:
    """The consumer launched with one task waiting: seconds until its result is there (median)."""
    huey, task = target.open()
    samples = []
    for i in range(repeats):
        handle = task(i)
        samples.append(_launch_to_result(target, handle, sizes.timeout))
        result.check("startup_result", handle.get(preserve=True) == i, f"start-up task {i} gave another result")
    result.figures["startup_s"] = percentile(samples, 50)
    huey.flush()


def run(target: HueyTarget, sizes: Sizes, result: Result, log: Callable[[str], None]) -> None:
    result.notes.append("huey_consumer -w 1 -k thread" + (" -d 0.001 -b 2 -m 0.2" if target.kind == "sqlite"
                                                                 else "; RedisHuey's defaults"))
    steps: list[tuple[str, Callable[[], None]]] = [
        ("enqueue", lambda: enqueue(target, sizes, result)),
        ("processing, 1 consumer", lambda: processing(target, sizes, result)),
        ("latency and idle consumer", lambda: latency(target, sizes, result)),
        ("consumer start-up", lambda: startup(target, sizes, result)),
    ]
    for name, step in steps:
        log(f"  {result.system}: {name}")
        try:
            step()
        except Exception as exc:
            result.check(name, False, f"{type(exc).__name__}: {exc}")
