"""Start-up cost of the pool's and the worker's interpreters, and an idle pool's stop latency.

    .venv/bin/python scripts/measure-startup.py [--starts 20] [--top 25] [BACKEND ...]

For each backend (sqlite, redis, mongodb, postgres; each server started here):

* imports: ``-X importtime`` of one worker start (``skunkqueue.worker_main`` as the pool
  starts it, ``--burst`` on an empty route: start, register, one claim, exit) and of one
  pool start (``skunq work --burst``; ``-X`` is not passed on to its worker), the
  modules with the largest cumulative time;
* CPU per start: user+sys (RUSAGE_CHILDREN) of N such worker starts, and of N
  ``skunq work --burst`` runs (the pool and its one worker: the whole tree);
* stop latency: an idle ``skunq work`` (0.3 s after its worker registered, so
  waiting for work), SIGTERM to the pool, time until it exited.

Used for docs/performance.md ("Session 11: start-up imports").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skunkqueue import backends, hooks, interpreter  # noqa: E402
from skunkqueue.worker import WorkerConfig  # noqa: E402

SKUNQ = str(Path(sys.executable).parent / "skunq")
LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def servers(names: list[str], folder: Path) -> tuple[dict[str, str], list[object]]:
    urls: dict[str, str] = {}
    running: list[object] = []
    for name in names:
        if name == "sqlite":
            urls[name] = str(folder / "q.db")
        elif name == "redis":
            from tests.redis_servers import RedisServer

            server = RedisServer(folder / "redis").start()
            running.append(server)
            urls[name] = server.url
        elif name == "mongodb":
            from tests.mongo_servers import MongoServer

            mongo = MongoServer(folder / "mongo").start()
            running.append(mongo)
            urls[name] = mongo.url
        elif name == "postgres":
            from tests.postgres_servers import PostgresServer

            pg = PostgresServer(folder / "pg").start()
            running.append(pg)
            urls[name] = pg.url
    return urls, running


def importtime(stderr: str) -> dict[str, float]:
    """module -> cumulative ms, from -X importtime output."""
    found: dict[str, float] = {}
    for line in stderr.splitlines():
        match = LINE.match(line)
        if match:
            name = match.group(4)
            found[name] = max(found.get(name, 0.0), int(match.group(2)) / 1000)
    return found


def worker_argv(backend: str, url: str, queue: str, extra: tuple[str, ...] = ()) -> list[str]:
    config = WorkerConfig(queue=queue, route="r", backend=backend, url=url, burst=True, connect_attempts=1)
    if hasattr(config, "plugins"):  # what `skunq work` tells its workers (session 11 on)
        found = backends.entry_point(backend)
        config.entry = found.value if found is not None else None  # type: ignore[attr-defined]
        config.plugins = [[name, value] for name, value in hooks.entries()]  # type: ignore[attr-defined]
    argv = interpreter.command("skunkqueue.worker_main", config.to_json())
    return [argv[0], *extra, *argv[1:]]


def pool_argv(backend: str, url: str, queue: str, extra: tuple[str, ...] = (), burst: bool = True) -> list[str]:
    return [sys.executable, *extra, SKUNQ, "work", "-q", queue, "-r", "r", "--backend", backend, "--url", url,
            "--log-level", "WARNING", *(["--burst"] if burst else [])]


def cpu_of(argvs: list[list[str]], cwd: Path) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for argv in argvs:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)
        if done.returncode not in (0, 5):
            raise RuntimeError(f"{argv[:4]} exited {done.returncode}: {done.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / len(argvs)


def stop_latency(backend: str, url: str, queue: str, cwd: Path, idle: float) -> float:
    pool = subprocess.Popen(pool_argv(backend, url, queue, burst=False), cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    store = backends.open_backend(queue, backend, url=url)
    try:
        deadline = time.monotonic() + 60
        while not store.workers() and pool.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        store.close()
    time.sleep(idle)  # the worker registered; now it is waiting for work
    started = time.monotonic()
    pool.send_signal(signal.SIGTERM)
    pool.wait(60)
    took = time.monotonic() - started
    if pool.returncode != 0:
        raise RuntimeError(f"pool exited {pool.returncode}: {pool.stderr.read()[-2000:] if pool.stderr else ''}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("backends", nargs="*", default=["sqlite", "redis", "mongodb", "postgres"])
    parser.add_argument("--starts", type=int, default=20)
    parser.add_argument("--stops", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the servers on the way out
    env_note = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="skunq-startup-") as tmp:
        folder = Path(tmp)
        cwd = folder / "cwd"
        cwd.mkdir()
        urls, running = servers(args.backends, folder)
        report: dict[str, object] = {"load_before": env_note}
        try:
            for name in args.backends:
                url = urls[name]
                queue = f"startup{name}"
                worker = subprocess.run(worker_argv(name, url, queue, ("-X", "importtime")), cwd=cwd,
                                        capture_output=True, text=True, timeout=120)
                pool = subprocess.run(pool_argv(name, url, queue, ("-X", "importtime")), cwd=cwd,
                                      capture_output=True, text=True, timeout=120)
                w_imports, p_imports = importtime(worker.stderr), importtime(pool.stderr)
                w_cpu = cpu_of([worker_argv(name, url, queue)] * args.starts, cwd)
                p_cpu = cpu_of([pool_argv(name, url, queue)] * args.starts, cwd)
                stops = sorted(stop_latency(name, url, queue, cwd, 0.3) for _ in range(args.stops))
                report[name] = {"worker_imports": w_imports, "pool_imports": p_imports,
                                "worker_cpu": w_cpu, "pool_tree_cpu": p_cpu, "stop": stops}
                print(f"== {name}: worker start {w_cpu * 1000:.0f} ms CPU, pool --burst tree "
                      f"{p_cpu * 1000:.0f} ms CPU ({args.starts} each); stop latency (s) "
                      + " ".join(f"{s:.2f}" for s in stops))
                print(f"   modules imported: worker {len(w_imports)}, pool {len(p_imports)}")
                for label, table in (("worker", w_imports), ("pool", p_imports)):
                    top = sorted(table.items(), key=lambda kv: -kv[1])[: args.top]
                    print(f"   {label} imports, cumulative ms: "
                          + ", ".join(f"{mod} {ms:.1f}" for mod, ms in top))
        finally:
            for server in running:
                server.stop()  # type: ignore[attr-defined]
        report["load_after"] = os.getloadavg()
        print(f"load average before {env_note[0]:.2f}, after {report['load_after'][0]:.2f}")  # type: ignore[index]
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
