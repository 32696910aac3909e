"""The store's cost per job of the worker's two claim patterns, without a pool:
``python -m benchmarks.claim_pattern redis|sqlite JOBS ROUNDS [REDIS_URL REDIS_PID]``.

Pattern 1 (``--prefetch 1``): ``finish_and_claim`` of one job after each job. Pattern 16 (what
``--prefetch auto`` does with short jobs): claims of 16, a plain ``finish`` while jobs are held and
``finish_and_claim`` of 16 on the last one. Both make one store call per job; the second claims
(and on Redis packs and decodes) its jobs in a sixteenth of the calls. Per job: this process's CPU
(the client; on SQLite the store's work as well) and, with a pid, redis-server's CPU (``/proc``),
in rounds alternating the two (1 16, then 16 1, ...).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

from benchmarks import jobs
from skunkqueue import SkunkQueue
from skunkqueue.record import COMPLETE, Outcome


def server_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(backend: str, url: str, n: int, size: int, name: str, pid: int | None) -> tuple[float, float, float]:
    queue = SkunkQueue(name, backend=backend, conn_url=url)
    jobs.bind(queue, jobs.noop, "p").fire_many([(i,) for i in range(n)])
    store = queue.persistence
    cpu, server, start = time.process_time(), server_cpu(pid), time.perf_counter()
    held, done = store.claim("p", "w1", 30.0, size), 0
    while held:
        record = held.pop(0)
        outcome = Outcome(state=COMPLETE, result=b"null")
        if held:
            store.finish(record.id, record.token, outcome)
        else:
            _, held = store.finish_and_claim(record.id, record.token, outcome, "p", "w1", 30.0, size)
        done += 1
    cpu, server, wall = time.process_time() - cpu, server_cpu(pid) - server, time.perf_counter() - start
    assert done == n, done
    queue.purge("p")
    queue.close()
    return cpu / n * 1e6, server / n * 1e6, n / wall


def main(argv: list[str]) -> None:
    backend, n, rounds = argv[0], int(argv[1]), int(argv[2])
    url, pid = (argv[3], int(argv[4])) if backend == "redis" else (None, None)
    scratch = tempfile.mkdtemp(prefix="claim-pattern-")
    runs: dict[int, list[tuple[float, float, float]]] = {1: [], 16: []}
    for round_ in range(rounds):
        for size in (1, 16) if round_ % 2 == 0 else (16, 1):
            where = url or f"{scratch}/{round_}-{size}.db"
            runs[size].append(run(backend, where, n, size, f"cp{round_}x{size}", pid))
    for size, done in runs.items():
        figures = []
        for i, label in enumerate(("client CPU/job us", "redis-server CPU/job us", "jobs/s")):
            values = [r[i] for r in done]
            figures.append(f"{label} {statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})")
        print(f"claims of {size:2}: " + ", ".join(figures))
    print("load average:", open("/proc/loadavg").read().strip())


if __name__ == "__main__":
    main(sys.argv[1:])
