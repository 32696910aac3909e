"""Helpers shared by the SkunkQueue and Huey workloads."""

from __future__ import annotations

import compileall
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def compile_sources() -> None:
    """Bytecode for SkunkQueue's sources, as an installed wheel has it (pip compiles at install).

    An editable install has none, and where ``PYTHONDONTWRITEBYTECODE`` is set (this workplace sets
    it) every pool and worker the benchmarks start would compile the sources anew: ~200 ms of CPU
    per ``skunq work`` start-up measured here, which the peers, installed from wheels, do not pay.
    A source changed since is still read fresh (Python checks each file's mtime).
    """
    for src in sorted(ROOT.glob("skunkqueue-*/src")):
        compileall.compile_dir(str(src), quiet=2, workers=0)
    compileall.compile_dir(str(ROOT / "benchmarks"), quiet=2, workers=0)


class BenchError(RuntimeError):
    """A workload could not finish or produced wrong results."""


@dataclass
class Sizes:
    """How much work each workload does (see the --flags of ``python -m benchmarks``)."""

    fire: int = 5000          # jobs fired one by one
    batch: int = 20000        # jobs fired with fire_many ...
    batch_size: int = 1000    # ... this many per call
    process: int = 5000       # jobs pre-enqueued for the processing runs
    latency: int = 300        # fire -> result round trips
    latency_gap: float = 0.02  # idle pause between round trips, seconds
    backlog: int = 100_000    # queued jobs for the large backlog
    backlog_small: int = 1000  # ... and for the small one
    claims: int = 1000        # claims timed per backlog measurement
    timeout: float = 300.0    # give up on any one wait after this long


@dataclass
class Result:
    """The figures of one system (a backend, or Huey on one store)."""

    system: str
    figures: dict[str, float] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks[name] = self.checks.get(name, True) and ok
        if not ok:
            self.errors.append(f"{name}: {detail}" if detail else name)

    def to_json(self) -> dict[str, Any]:
        return {"figures": self.figures, "checks": self.checks, "notes": self.notes, "errors": self.errors}


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, pause: float = 0.002) -> float:
    """Poll ``predicate`` until true; return the monotonic time it was first seen true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(pause)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` (VmRSS in /proc/PID/status), in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads) so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def idle_cpu_percent(pid: int, seconds: float = 2.0) -> float:
    before = cpu_seconds(pid)
    time.sleep(seconds)
    return 100 * (cpu_seconds(pid) - before) / seconds


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    for task in task_dir.iterdir() if task_dir.exists() else []:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")
