"""SkunkQueue against Huey, Celery, RQ and Dramatiq on one redis-server, or against Procrastinate on one
PostgreSQL server (``--store postgres``), in alternated rounds:
``python -m benchmarks.peers [--store redis|postgres] [--rounds N] [--quick]`` (``make bench`` runs both).

Each round runs every system once, in order on even rounds and reversed on odd ones (A B C D E,
E D C B A, ...), so the machine's drift hits them alike; each figure is printed as the median and
the lowest-highest run, with SkunkQueue's ratio to each peer. One round of one system:

1. ``fire`` one call at a time, ``--fire`` jobs (timed), with no worker running;
2. its worker command launched with those jobs waiting: *start-up* is launch -> the first job's
   result readable, *processing* is the jobs after it / (first result -> every result readable),
   each handle read through the library's public API in firing order;
3. a fresh worker in the latency set-up, ``--latency`` idle round trips fire -> result by the
   library's own blocking wait (p50, p99); then the worker command's idle RSS.

Every result is checked against its argument. Each library runs in its fastest documented set-up
for each figure (``benchmarks.peer_systems``: printed with the figures).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import (
    ROOT,
    BenchError,
    Sizes,
    children_of,
    compile_sources,
    percentile,
    rss_mb,
    stop_process,
    wait_until,
)
from benchmarks.peer_systems import DEFAULT, DEFAULT_POSTGRES, PEERS, Peer

# (key, label, format, higher is better)
FIGURES = [
    ("enqueue_fire", "fire one by one (jobs/s)", "{:,.0f}", True),
    ("process_1w", "processing, 1 worker process, first->last result (jobs/s)", "{:,.0f}", True),
    ("latency_p50_ms", "idle fire->result p50 (ms)", "{:.2f}", False),
    ("latency_p99_ms", "idle fire->result p99 (ms)", "{:.2f}", False),
    ("startup_s", "start-up, launch->first result (s)", "{:.2f}", False),
    ("idle_rss_mb", "idle RSS, the process running jobs (MB)", "{:.1f}", False),
    ("idle_rss_all_mb", "idle RSS, all processes of the command (MB)", "{:.1f}", False),
]
LOWER_IS_BETTER = {key for key, _, _, higher in FIGURES if not higher}
MIN_ROUNDS = 3
STORES = {"redis": "Redis", "postgres": "PostgreSQL"}
PG_DATABASE = "skunqpeers"  # dropped and made anew before each workload (the PostgreSQL flush)


@dataclass
class PeerRuns:
    """One system's figures, one dict per round, and what went wrong."""

    name: str
    rounds: list[dict[str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [r[key] for r in self.rounds if key in r]

    def median(self, key: str) -> float | None:
        values = self.values(key)
        return statistics.median(values) if values else None


def _tree(pid: int) -> list[int]:
    found = [pid]
    for child in children_of(pid):
        found += _tree(child)
    return found


class _Worker:
    """A peer's worker command, its output in a log file."""

    def __init__(self, peer: Peer, url: str, latency: bool, logdir: Path) -> None:
        cmd, env = peer.command(url, latency)
        self.peer, self.log = peer, logdir / f"peer-{peer.name}.log"
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)

    def alive(self) -> None:
        if self.process.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise BenchError(f"{self.peer.name}'s worker exited with {self.process.returncode}:\n{tail}")

    def until(self, predicate: Callable[[], bool], what: str, timeout: float) -> float:
        def check() -> bool:
            self.alive()
            return predicate()
        return wait_until(check, timeout, f"{self.peer.name}: {what}")

    def rss(self) -> tuple[float, float]:
        """(largest process, all processes) of the command, in MB."""
        sizes = []
        for pid in _tree(self.process.pid):
            try:
                sizes.append(rss_mb(pid))
            except (OSError, BenchError):
                continue
        return max(sizes), sum(sizes)

    def stop(self) -> None:
        stop_process(self.process, self.peer.stop_signal)


def _check(peer: Peer, handles: list[Any], args: list[int], what: str) -> None:
    wrong = [(i, v) for h, i in zip(handles, args) if (v := peer.value(h)) != i]
    if wrong:
        raise BenchError(f"{peer.name} {what}: {len(wrong)} of {len(handles)} results wrong, e.g. {wrong[:3]}")


def one_round(peer: Peer, url: str, sizes: Sizes, logdir: Path, flush: Callable[[], None]) -> dict[str, float]:
    """The figures of one round of one system (see the module's docstring)."""
    figures: dict[str, float] = {}
    flush()
    peer.open(url, latency=False)
    try:
        handles = [peer.fire(-1)]  # connects; the first job of the backlog
        start = time.perf_counter()
        handles += [peer.fire(i) for i in range(sizes.fire)]
        figures["enqueue_fire"] = sizes.fire / (time.perf_counter() - start)
        launched = time.monotonic()
        worker = _Worker(peer, url, False, logdir)
        try:
            first = worker.until(lambda: peer.done(handles[0]), "the first result", sizes.timeout)
            last = first
            for handle in handles[1:]:
                last = worker.until(partial(peer.done, handle), "every result", sizes.timeout)
        finally:
            worker.stop()
        figures["startup_s"] = first - launched
        figures["process_1w"] = (len(handles) - 1) / (last - first)
        _check(peer, handles, [-1, *range(sizes.fire)], "processing")
    finally:
        peer.close()
    flush()
    peer.open(url, latency=True)
    try:
        worker = _Worker(peer, url, True, logdir)
        try:
            for i in range(5):  # warm up: the worker's start, imports, connections
                worker.alive()
                peer.wait(peer.fire(i))
            samples, wrong = [], 0
            for i in range(sizes.latency):
                time.sleep(sizes.latency_gap)
                start = time.perf_counter()
                value = peer.wait(peer.fire(i))
                samples.append(time.perf_counter() - start)
                wrong += value != i
            if wrong:
                raise BenchError(f"{peer.name} latency: {wrong} wrong results")
            figures["latency_p50_ms"] = 1000 * percentile(samples, 50)
            figures["latency_p99_ms"] = 1000 * percentile(samples, 99)
            time.sleep(1.0)
            worker.alive()
            figures["idle_rss_mb"], figures["idle_rss_all_mb"] = worker.rss()
        finally:
            worker.stop()
    finally:
        peer.close()
    flush()
    return figures


def order(names: list[str], round_: int) -> list[str]:
    """A B C on even rounds, C B A on odd ones."""
    return names if round_ % 2 == 0 else names[::-1]


def run(url: str, flush: Callable[[], None], sizes: Sizes, rounds: int, names: list[str], logdir: Path,
        log: Callable[[str], None]) -> dict[str, PeerRuns]:
    """``rounds`` alternated rounds of every system in ``names`` on the store at ``url`` (``flush`` empties it)."""
    runs = {name: PeerRuns(name) for name in names}
    for round_ in range(rounds):
        for name in order(names, round_):
            log(f"  peers round {round_ + 1}/{rounds}: {name}")
            try:
                runs[name].rounds.append(one_round(PEERS[name](), url, sizes, logdir, flush))
            except Exception as exc:  # keep going: the other systems still say something
                runs[name].errors.append(f"round {round_ + 1}: {type(exc).__name__}: {exc}")
                flush()
    return runs


def better_ratio(key: str, ours: float, theirs: float) -> float:
    """SkunkQueue against a peer, above 1 when SkunkQueue is better."""
    top, bottom = (theirs, ours) if key in LOWER_IS_BETTER else (ours, theirs)
    return top / bottom if bottom else float("inf")


def ratios(runs: dict[str, PeerRuns], ours: str | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Per peer and figure: the ratio of medians and the lowest-highest ratio of the same round's runs
    (``ours``: SkunkQueue's system, by default the first whose name starts with "skunkqueue")."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    ours = ours or next((n for n in runs if n.startswith("skunkqueue")), "skunkqueue")
    base = runs.get(ours)
    if base is None:
        return out
    for name, peer in runs.items():
        if name == ours:
            continue
        per: dict[str, dict[str, float]] = {}
        for key, *_ in FIGURES:
            a, b = base.median(key), peer.median(key)
            if a is None or b is None:
                continue
            paired = [better_ratio(key, x[key], y[key]) for x, y in zip(base.rounds, peer.rounds)
                      if key in x and key in y]
            per[key] = {"ratio": better_ratio(key, a, b), "low": min(paired), "high": max(paired)}
        out[name] = per
    return out


def table(runs: dict[str, PeerRuns], rounds: int) -> str:
    names = [n for n in runs if runs[n].rounds]
    width = max(len(label) for _, label, _, _ in FIGURES)
    cells: dict[str, list[str]] = {}
    for key, _, form, _ in FIGURES:
        for name in names:
            values = runs[name].values(key)
            cells.setdefault(key, []).append(
                f"{form.format(statistics.median(values))} ({form.format(min(values))}-{form.format(max(values))})"
                if values else "-")
    cols = [max(len(n), *(len(cells[k][i]) for k, *_ in FIGURES)) + 2 for i, n in enumerate(names)]
    store = STORES.get(PEERS[names[0]].store if names and names[0] in PEERS else "redis", "Redis")
    lines = [f"{store}, one worker process each; median (lowest-highest) of {rounds} alternated rounds",
             f"{'':{width}}" + "".join(f"{n:>{c}}" for n, c in zip(names, cols))]
    lines.append("-" * len(lines[-1]))
    for key, label, _, _ in FIGURES:
        lines.append(f"{label:{width}}" + "".join(f"{cell:>{c}}" for cell, c in zip(cells[key], cols)))
    lines.append(f"{'runs with every result right':{width}}" +
                 "".join(f"{f'{len(runs[n].rounds)}/{rounds}':>{c}}" for n, c in zip(names, cols)))
    rat = ratios(runs)
    if rat:
        lines += ["", "SkunkQueue / peer (x > 1: SkunkQueue better; for times and sizes it is theirs / ours): "
                      "ratio of medians [lowest-highest of the same round's runs]",
                  f"{'':{width}}" + "".join(f"{'vs ' + n:>26}" for n in rat)]
        lines.append("-" * len(lines[-1]))
        for key, label, _, _ in FIGURES:
            row = [(f"{r[key]['ratio']:.2f}x [{r[key]['low']:.2f}-{r[key]['high']:.2f}]" if key in r else "-")
                   for r in rat.values()]
            lines.append(f"{label:{width}}" + "".join(f"{c:>26}" for c in row))
    return "\n".join(lines)


def setups(names: list[str]) -> str:
    lines = ["Set-ups (each library's fastest documented one for each figure):"]
    for name in names:
        for part, text in PEERS[name].setup.items():
            lines.append(f"  {name:10} {part:8} {text}")
    return "\n".join(lines)


def to_json(runs: dict[str, PeerRuns], rounds: int) -> dict[str, Any]:
    return {
        "rounds": rounds,
        "order": "alternated: rounds 1, 3, ... in the listed order, rounds 2, 4, ... reversed",
        "setups": {name: PEERS[name].setup for name in runs},
        "systems": {name: {"rounds": r.rounds, "errors": r.errors,
                           "median": {k: r.median(k) for k, *_ in FIGURES if r.values(k)}}
                    for name, r in runs.items()},
        "ratios": ratios(runs),
    }


def wanted(spec: str, log: Callable[[str], None], store: str = "redis") -> tuple[list[str], dict[str, str]]:
    """The systems named in ``spec`` that are installed, and why each other one is skipped."""
    names, skipped = [], {}
    for name in (n.strip() for n in spec.split(",") if n.strip()):
        choices = [n for n, p in PEERS.items() if p.store == store]
        if name not in choices:
            raise SystemExit(f"unknown peer {name!r} on {STORES[store]}; choose from {', '.join(choices)}")
        if PEERS[name].available():
            names.append(name)
        else:
            skipped[name] = f"not installed (pip install '{PEERS[name].distribution}')"
            log(f"skipping {name}: {skipped[name]}")
    return names, skipped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    redis_more = sorted(n for n, p in PEERS.items() if p.store == "redis" and n not in DEFAULT)
    parser.add_argument("--peers", default=",".join(DEFAULT),
                        help=f"systems compared on Redis, in round order (default: %(default)s; also: "
                             f"{', '.join(redis_more)})")
    parser.add_argument("--pg-peers", default=",".join(DEFAULT_POSTGRES),
                        help="systems compared on PostgreSQL, in round order (default: %(default)s)")
    parser.add_argument("--rounds", type=int,
                        help=f"alternated rounds of the peer comparison (default {MIN_ROUNDS}, 1 with --quick; "
                             f"fewer than {MIN_ROUNDS} gives no meaningful spread)")


def rounds_from(args: argparse.Namespace) -> int:
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else MIN_ROUNDS)
    if rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    return int(rounds)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.servers import PostgresServer, RedisServer

    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--store", choices=list(STORES), default="redis",
                        help="the server the systems share: redis (--peers) or postgres (--pg-peers)")
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke test")
    parser.add_argument("--fire", type=int, help="jobs fired one by one, then processed (default 5000)")
    parser.add_argument("--latency", type=int, help="idle round trips (default 300)")
    parser.add_argument("--json", help="where to write the figures")
    args = parser.parse_args(argv)
    sizes = Sizes(fire=500, latency=50) if args.quick else Sizes()
    compile_sources()
    sizes.fire = args.fire or sizes.fire
    sizes.latency = args.latency or sizes.latency
    rounds = rounds_from(args)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    names, skipped = wanted(args.peers if args.store == "redis" else args.pg_peers, log, args.store)
    import tempfile

    server = RedisServer() if args.store == "redis" else PostgresServer()
    with tempfile.TemporaryDirectory(prefix="skunqbench-peers-") as logdir, server:
        if isinstance(server, RedisServer):
            runs = run(server.url, server.flush, sizes, rounds, names, Path(logdir), log)
        else:
            assert isinstance(server, PostgresServer)
            runs = run(server.database_url(PG_DATABASE), partial(server.recreate, PG_DATABASE), sizes, rounds,
                       names, Path(logdir), log)
        print(table(runs, rounds))
        print(setups(names))
        for name, why in skipped.items():
            print(f"(skipped {name}: {why})")
        errors = [f"{n}: {e}" for n, r in runs.items() for e in r.errors]
        for error in errors:
            print(f"CHECK FAILED {error}")
        if args.json:
            Path(args.json).write_text(json.dumps(to_json(runs, rounds), indent=2) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
