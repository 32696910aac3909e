"""What one worker job's finish_and_claim costs inside Redis, for two or more copies of scripts/.

    python -m benchmarks.lua_cost [-n JOBS] [-r ROUNDS] [--limit L] [--pin] DIR [DIR ...]
    python -m benchmarks.lua_cost --callgrind [-n JOBS] [--limit L] DIR [DIR ...]
    python -m benchmarks.lua_cost --commands [-n JOBS] [--limit L] DIR [DIR ...]

Each DIR holds the .lua files (a copy of skunkqueue-redis/src/skunkqueue_redis/scripts). Per round,
one queue per DIR gets JOBS records and one claim; then the queues' finish_and_claim calls alternate
(A B B A ...), so load from elsewhere on the machine hits every variant alike. SLOWLOG (threshold 0)
times each call inside Redis; per round the mean per variant is reported, and the paired
difference against the first DIR. A private redis-server runs on a free port.

Timings on a shared machine wander by several microseconds; --callgrind instead runs redis-server
under valgrind and counts the instructions inside evalShaCommand over the JOBS calls (one server
per DIR, one after another): deterministic, so a lever worth a microsecond shows.
--commands counts the Redis commands per job (`INFO commandstats` before and after JOBS calls,
the script's own calls and the EVALSHA itself), each command's count listed.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Sequence

import redis

from benchmarks import servers
from skunkqueue import policy
from skunkqueue.testing.suite_support import make_record
from skunkqueue_redis import scripts
from skunkqueue_redis.persistence import RedisPersistence


def store_with(port: int, directory: Path, queue: str) -> RedisPersistence:
    original = scripts.read
    scripts.read = lambda name: (directory / f"{name}.lua").read_text(encoding="utf-8")  # type: ignore[assignment]
    try:
        return RedisPersistence(queue, url=f"127.0.0.1:{port}")
    finally:
        scripts.read = original  # type: ignore[assignment]


def one_round(port: int, dirs: list[Path], jobs: int, limit: int, raw: redis.Redis, r: int) -> list[float]:
    raw.flushall()
    raw.script_flush()
    stores, held, shas = [], [], []
    for i, d in enumerate(dirs):
        store = store_with(port, d, f"q{r}v{i}")
        store.enqueue([make_record(store.queue) for _ in range(jobs + limit)])
        held.append(store.claim("r", "w", 30, limit))
        stores.append(store)
        shas.append(store._script._loaded["finish_and_claim"].sha.encode())
    times: dict[bytes, list[int]] = {sha: [] for sha in shas}

    def drain() -> None:
        for entry in raw.execute_command("SLOWLOG", "GET", "-1"):
            args: Any = entry[3]
            if args and args[0].upper() == b"EVALSHA" and args[1] in times:
                times[args[1]].append(int(entry[2]))
        raw.execute_command("SLOWLOG", "RESET")

    raw.execute_command("SLOWLOG", "RESET")
    for n in range(jobs):
        for i in (range(len(stores)) if n % 2 == 0 else reversed(range(len(stores)))):  # ABBA: no place is favoured
            store = stores[i]
            job = held[i].pop(0)
            if held[i]:
                store.finish(job.id, job.token, policy.completed(b"1"))
            else:
                _, held[i] = store.finish_and_claim(job.id, job.token, policy.completed(b"1"), "r", "w", 30, limit)
        if n % 200 == 199:
            drain()
    drain()
    for store in stores:
        store.close()
    return [statistics.fmean(times[sha]) for sha in shas]


def start_server(prefix: list[str], directory: str, patience: float,
                 extra: Sequence[str] = ()) -> tuple[Any, redis.Redis]:
    """A private redis-server (the tests' starter, run under ``prefix``, e.g. valgrind) and a client."""
    server = servers.redis_servers.RedisServer(Path(directory), prefix=prefix, extra=list(extra))
    server.start(timeout=patience)
    return server, redis.Redis(port=server.port)


def callgrind(directory: Path, jobs: int, limit: int, keep: Path | None = None) -> float:
    """Instructions per finish_and_claim call inside evalShaCommand, redis-server under callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        server, _ = start_server(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                                  "--toggle-collect=evalShaCommand", f"--callgrind-out-file={out}"],
                                 tmp, patience=60.0)
        pid = str(server.process.pid)
        try:
            store = store_with(server.port, directory, "q")
            store.enqueue([make_record(store.queue) for _ in range(jobs + limit)])
            held = store.claim("r", "w", 30, limit)
            subprocess.run(["callgrind_control", "-i", "on", pid], check=True, stdout=subprocess.DEVNULL)
            for _ in range(jobs):
                job = held.pop(0)
                if held:
                    store.finish(job.id, job.token, policy.completed(b"1"))
                else:
                    _, held = store.finish_and_claim(job.id, job.token, policy.completed(b"1"), "r", "w", 30, limit)
            subprocess.run(["callgrind_control", "-i", "off", pid], check=True, stdout=subprocess.DEVNULL)
            store.close()
        finally:
            server.stop()
        if keep:
            shutil.copy(out, keep / f"callgrind.{directory.name}.out")
        for line in out.read_text().splitlines():
            if line.startswith("totals:"):
                return int(line.split()[1]) / jobs
    raise RuntimeError("callgrind wrote no totals")


def commands(directory: Path, jobs: int, limit: int) -> tuple[float, dict[str, float]]:
    """Redis commands per job (claim+finish) over JOBS finish_and_claim calls, and per command."""
    with tempfile.TemporaryDirectory() as tmp:
        server, raw = start_server([], tmp, patience=5.0)
        try:
            store = store_with(server.port, directory, "q")
            store.enqueue([make_record(store.queue) for _ in range(jobs + limit)])
            held = store.claim("r", "w", 30, limit)

            def stats() -> dict[str, int]:
                return {name.removeprefix("cmdstat_"): int(value["calls"])
                        for name, value in raw.info("commandstats").items()}

            before = stats()
            for _ in range(jobs):
                job = held.pop(0)
                if held:
                    store.finish(job.id, job.token, policy.completed(b"1"))
                else:
                    _, held = store.finish_and_claim(job.id, job.token, policy.completed(b"1"), "r", "w", 30, limit)
            after = stats()
            store.close()
        finally:
            server.stop()
    per = {name: (calls - before.get(name, 0)) / jobs for name, calls in after.items()}
    per = {name: n for name, n in per.items() if n > 0 and name != "info"}
    return sum(per.values()), per


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", "--jobs", type=int, default=1000)
    parser.add_argument("-r", "--rounds", type=int, default=6)
    parser.add_argument("--limit", type=int, default=1)
    parser.add_argument("--pin", dest="prefix", action="store_const", default=[],
                        const=["taskset", "-c", "1"], help="run redis-server on CPU 1 (run the client on 0)")
    parser.add_argument("--callgrind", action="store_true", help="count instructions instead of timing")
    parser.add_argument("--commands", action="store_true", help="count Redis commands per job")
    parser.add_argument("--keep", type=Path, help="with --callgrind: copy each callgrind.out into this folder")
    parser.add_argument("dirs", nargs="+", type=Path)
    opts = parser.parse_args()
    if opts.commands:
        for d in opts.dirs:
            total, per = commands(d, opts.jobs, opts.limit)
            listed = " ".join(f"{name}={n:g}" for name, n in sorted(per.items(), key=lambda item: -item[1]))
            print(f"{str(d):20s} {total:6.2f} commands per job: {listed}")
        return
    if opts.callgrind:
        base = None
        for d in opts.dirs:
            ir = callgrind(d, opts.jobs, opts.limit, opts.keep)
            base = base or ir
            print(f"{str(d):20s} {ir:10.0f} instructions per call ({(ir - base) / base:+.1%})")
        return
    with tempfile.TemporaryDirectory() as tmp:
        server, raw = start_server(opts.prefix, tmp, patience=5.0,
                                   extra=["--slowlog-log-slower-than", "0", "--slowlog-max-len", "100000"])
        try:
            rounds = [one_round(server.port, opts.dirs, opts.jobs, opts.limit, raw, r) for r in range(opts.rounds)]
            for i, d in enumerate(opts.dirs):
                values = [row[i] for row in rounds]
                diffs = [row[i] - row[0] for row in rounds]
                print(f"{str(d):20s} mean {statistics.fmean(values):7.2f} us  "
                      f"paired diff {statistics.fmean(diffs):+6.2f} (median {statistics.median(diffs):+6.2f})  "
                      f"rounds {' '.join(f'{v:.1f}' for v in values)}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
