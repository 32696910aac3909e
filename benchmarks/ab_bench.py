"""``make bench``'s SkunkQueue figures, before and after, in one run:
``python -m benchmarks.ab_bench BACKEND ROUNDS TREE:LEVEL ... [--backlog N] [--process N] ...``.

Each TREE is an exported checkout (``git archive REV | tar -x -C TREE``). Each run is that tree's
own packages and its own benchmark harness (``benchmarks.skunk.run``: enqueue, processing with 1 and
2 workers, idle latency, backlog, and start-up where the tree has it), with its workers at
``--log-level`` LEVEL, on BACKEND (``redis``: one redis-server for all runs, flushed before each;
``sqlite``: a new database file per run). The trees alternate (A B, then B A, ...), so the machine's
drift hits them alike.

It prints every run's figures, then per figure and tree the median and the spread (lowest and highest
run: the noise), and each tree's paired ratio against the first (median of the per-round ratios,
oriented so that above 1 is better). A figure's change is beyond noise when the paired ratio lies
outside the spread the first tree shows between its own runs. Used for issue 10's before/after
(docs/performance.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from typing import Iterator

from benchmarks.servers import RedisServer

CHILD = r'''
import dataclasses, json, sys
from pathlib import Path
from benchmarks import skunk
from benchmarks.common import Result, Sizes
backend, url, level, workdir, overrides = sys.argv[1:6]
known = {f.name for f in dataclasses.fields(Sizes)}
sizes = Sizes(**{k: v for k, v in json.loads(overrides).items() if k in known})
target = skunk.Target(backend, url=url, logdir=Path(workdir))
if hasattr(target, "log_level"):  # older trees ran their workers at WARNING, fixed
    target.log_level = level
result = Result(backend)
skunk.run(target, sizes, result, lambda line: print(line, file=sys.stderr, flush=True))
print(json.dumps({"figures": result.figures, "errors": result.errors,
                  "failed": [name for name, ok in result.checks.items() if not ok]}))
'''

# Figures where lower is better; every other figure is a rate or a ratio, higher is better.
LOWER_IS_BETTER = ("latency_p50_ms", "latency_p99_ms", "idle_rss_mb", "idle_cpu_pct", "startup_s")
SIZE_FLAGS = ("fire", "batch", "process", "latency", "backlog", "claims")  # of benchmarks.common.Sizes
PACKAGES = ("skunkqueue-core", "skunkqueue-redis", "skunkqueue-mongo", "skunkqueue-fdb")


def tree_env(tree: str) -> dict[str, str]:
    """The environment that runs ``tree``'s own packages and harness (no install needed)."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([tree, *(f"{tree}/{p}/src" for p in PACKAGES)]))


def alternating(rounds: int, specs: list[str]) -> Iterator[tuple[int, str, str, str]]:
    """(round, spec, tree, level) for each run: A B C, then C B A, ..., so drift hits every tree alike."""
    for round_ in range(rounds):
        for spec in specs if round_ % 2 == 0 else specs[::-1]:
            tree, level = spec.rsplit(":", 1)
            yield round_, spec, tree, level


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab_bench", description=__doc__.splitlines()[0])
    parser.add_argument("backend", choices=("redis", "sqlite"))
    parser.add_argument("rounds", type=int)
    parser.add_argument("trees", nargs="+", metavar="TREE:LEVEL")
    for name in SIZE_FLAGS:
        parser.add_argument(f"--{name}", type=int, help=f"Sizes.{name} (default: the tree's own)")
    return parser.parse_args(argv)


def run_once(tree: str, level: str, backend: str, url: str, overrides: dict[str, int]) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="ab-bench-") as workdir:
        if backend == "sqlite":
            url = os.path.join(workdir, "skunq.db")
        out = subprocess.run([sys.executable, "-c", CHILD, backend, url, level, workdir, json.dumps(overrides)],
                             cwd=tree, env=tree_env(tree), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def better_ratio(name: str, base: float, other: float) -> float:
    top, bottom = (base, other) if name in LOWER_IS_BETTER else (other, base)
    if bottom == 0:  # an idle CPU of 0 %, say
        return 1.0 if top == 0 else float("inf")
    return top / bottom


def report(trees: list[str], runs: dict[str, list[dict[str, float]]]) -> None:
    names = [n for n in runs[trees[0]][0] if all(n in r for spec in trees for r in runs[spec])]
    first = trees[0]
    print(f"\n{'figure':22} " + "  ".join(f"{spec:>36}" for spec in trees) + "  paired ratio (>1 better)")
    for name in names:
        cells = []
        for spec in trees:
            values = [r[name] for r in runs[spec]]
            cells.append(f"{statistics.median(values):>10.2f} ({min(values):.2f}-{max(values):.2f})".rjust(36))
        ratios = []
        for spec in trees[1:]:
            paired = [better_ratio(name, a[name], b[name]) for a, b in zip(runs[first], runs[spec])]
            base_values = [r[name] for r in runs[first]]
            # The first tree's own spread, as ratios to its median: what its runs disagree by.
            spread = [better_ratio(name, statistics.median(base_values), v) for v in base_values]
            low, high = min(spread), max(spread)
            verdict = "within noise" if low <= statistics.median(paired) <= high else (
                "better" if statistics.median(paired) > high else "WORSE")
            ratios.append(f"{statistics.median(paired):.3f} [noise {low:.2f}-{high:.2f}: {verdict}]")
        print(f"{name:22} " + "  ".join(cells) + "  " + "; ".join(ratios))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    overrides = {k: v for k in SIZE_FLAGS if (v := getattr(args, k)) is not None}
    runs: dict[str, list[dict[str, float]]] = {spec: [] for spec in args.trees}
    with RedisServer() if args.backend == "redis" else contextlib.nullcontext() as server:
        for round_, spec, tree, level in alternating(args.rounds, args.trees):
            if isinstance(server, RedisServer):
                server.flush()
            outcome = run_once(tree, level, args.backend, server.url if server else "", overrides)
            if outcome["errors"] or outcome["failed"]:
                print(f"{spec}: errors {outcome['errors']} failed checks {outcome['failed']}", file=sys.stderr)
            figures: dict[str, float] = outcome["figures"]  # type: ignore[assignment]
            runs[spec].append(figures)
            print(round_, spec, json.dumps({k: round(v, 2) for k, v in figures.items()}), flush=True)
    report(args.trees, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
