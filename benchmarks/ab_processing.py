"""Processing on Redis, paired across source trees: ``python -m benchmarks.ab_processing PAIRS JOBS TREE:LEVEL ...``.

``--sqlite`` first: on SQLite instead (a new database file per run; no server CPU column).

Each TREE is an exported checkout (``git archive REV | tar -x -C TREE``); each run uses that tree's
own packages and benchmark harness (``benchmarks.skunk.processing``, first claim to last result,
read through handles) at ``--log-level`` LEVEL, on one redis-server for all. The trees alternate
in order (A B C, then C B A, ...), so the machine's drift hits them alike. Per run it prints the
rate, the CPU of the pool and its worker per job (``RUSAGE_CHILDREN``, start-up included) and
redis-server's CPU per job (enqueueing included); then medians, and the paired rate ratio of each
tree against the first. Used for issue 10's comparison with f86c638 (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile

from benchmarks.ab_bench import alternating, tree_env
from benchmarks.servers import RedisServer

CHILD = r'''
import json, resource, sys
from pathlib import Path
from benchmarks import skunk
from benchmarks.common import Result, Sizes
url, n, level = sys.argv[1], int(sys.argv[2]), sys.argv[3]
backend = "sqlite" if not url.startswith("redis") else "redis"
target = skunk.Target(backend, url=url, logdir=Path("/tmp"))
if hasattr(target, "log_level"):  # older trees ran their workers at WARNING, fixed
    target.log_level = level
result = Result(backend)
before = resource.getrusage(resource.RUSAGE_CHILDREN)
skunk.processing(target, Sizes(process=n), result, 1)
after = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
print(json.dumps({"rate": result.figures["process_1w"], "cpu_us": cpu / n * 1e6}))
'''


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    sqlite = argv[0] == "--sqlite"
    argv = argv[1:] if sqlite else argv
    pairs, jobs, trees = int(argv[0]), argv[1], argv[2:]
    runs: dict[str, list[dict[str, float]]] = {spec: [] for spec in trees}
    with contextlib.ExitStack() as stack:
        server = None if sqlite else stack.enter_context(RedisServer())
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="ab-processing-"))
        for round_, spec, tree, level in alternating(pairs, trees):
            url = f"{scratch}/run{round_}-{len(runs[spec])}-{abs(hash(spec))}.db" if server is None else server.url
            before = cpu_seconds(server.starter.process.pid) if server is not None else 0.0
            out = subprocess.run([sys.executable, "-c", CHILD, url, jobs, level], cwd=tree,
                                 env=tree_env(tree), capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                return 1
            run = json.loads(out.stdout.strip().splitlines()[-1])
            if server is not None:
                run["redis_us"] = (cpu_seconds(server.starter.process.pid) - before) / int(jobs) * 1e6
            runs[spec].append(run)
            print(round_, spec, {k: round(v) for k, v in run.items()}, flush=True)
    for spec, done in runs.items():
        print(spec, *(f"{name} {statistics.median(r[name] for r in done):.0f} "
                      f"({min(r[name] for r in done):.0f}-{max(r[name] for r in done):.0f})"
                      for name in ("rate", "cpu_us", "redis_us") if name in done[0]))
    first = runs[trees[0]]
    for spec in trees[1:]:
        ratio = statistics.median(b["rate"] / a["rate"] for a, b in zip(first, runs[spec]))
        print(f"{spec}: paired rate ratio against {trees[0]}: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
