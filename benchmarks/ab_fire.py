"""``fire()`` one by one, paired across source trees: ``python -m benchmarks.ab_fire BACKEND PAIRS N TREE ...``.

Each TREE is an exported checkout (``git archive REV | tar -x -C TREE``), run with its own packages. Per
run a fresh interpreter fires N jobs one call at a time (``make bench``'s ``enqueue_fire``: a no-op job,
one argument, after one fire to connect) and prints the rate and the client's CPU per fire (user +
system of the process, ``time.process_time``). Trees alternate (A B, then B A, ...) on one
redis-server (``redis``) or a new SQLite file per run (``sqlite``).

On Redis it also measures the floor, alternated with the trees: the same enqueue script call for one
record, packed beforehand, sent and its reply read on a raw socket (no Python between calls but the
loop), and a raw ``LPUSH`` of a 250-byte string (Huey's enqueue, without redis-py around it).
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.ab_bench import tree_env
from benchmarks.servers import RedisServer

CHILD = r'''
import json, sys, time
from skunkqueue import SkunkQueue
from benchmarks import jobs
backend, url, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
queue = SkunkQueue("abfire", backend=backend, conn_url=url)
job = jobs.bind(queue, jobs.noop, "e")
job.fire(-1)  # connect first
cpu, start = time.process_time(), time.perf_counter()
for i in range(n):
    job.fire(i)
wall, cpu = time.perf_counter() - start, time.process_time() - cpu
queue.purge("e")
print(json.dumps({"rate": n / wall, "cpu_us": cpu / n * 1e6}))
'''


def floor(url: str, n: int) -> dict[str, dict[str, float]]:
    """Raw-socket round trips: the enqueue script for one record, and an LPUSH."""
    import hiredis

    pack: Any = hiredis.pack_command  # its stub takes a 1-tuple

    from benchmarks import jobs
    from skunkqueue import SkunkQueue

    queue = SkunkQueue("abfloor", backend="redis", conn_url=url)
    job = jobs.bind(queue, jobs.noop, "e")
    job.fire(-1)
    store: Any = queue.persistence
    script, k = store._script._loaded["enqueue"], store.keys
    commands = []
    for i in range(n):
        records = queue._records(store, job, [((i,), {})], time.time(), [None], None)[0]
        commands.append(pack((
            "EVALSHA", script.sha, 3, k.index, k.lease, k.fired, *store._script._head, b"86400",
            repr(time.time()).encode(), store.enqueue_chunks(records)[0])))
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def run(sent: list[bytes]) -> dict[str, float]:
        reader = hiredis.Reader()
        cpu, start = time.process_time(), time.perf_counter()
        for command in sent:
            sock.sendall(command)
            reply: Any = False
            while reply is False:
                reader.feed(sock.recv(65536))
                reply = reader.gets()
            if isinstance(reply, hiredis.ReplyError):
                raise RuntimeError(reply)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        return {"rate": len(sent) / wall, "cpu_us": cpu / len(sent) * 1e6}

    out = {"raw EVALSHA enqueue": run(commands),
           "raw LPUSH": run([pack(("LPUSH", "abfloor:list", b"x" * 250))] * n)}
    sock.sendall(pack(("DEL", "abfloor:list")))
    sock.recv(100)
    queue.purge("e")
    queue.close()
    sock.close()
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[0] not in ("redis", "sqlite"):
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    backend, pairs, n, trees = argv[0], int(argv[1]), argv[2], argv[3:]
    runs: dict[str, list[dict[str, float]]] = {tree: [] for tree in trees}
    with tempfile.TemporaryDirectory(prefix="ab-fire-") as scratch:
        server = RedisServer().start() if backend == "redis" else None
        try:
            for round_ in range(pairs):
                order = trees if round_ % 2 == 0 else trees[::-1]
                if server is not None and round_ % 2:
                    for name, run in floor(server.url, int(n)).items():
                        runs.setdefault(name, []).append(run)
                for tree in order:
                    url = server.url if server is not None else f"{scratch}/{round_}-{trees.index(tree)}.db"
                    out = subprocess.run([sys.executable, "-c", CHILD, backend, url, n], cwd=tree,
                                         env=tree_env(tree), capture_output=True, text=True)
                    if out.returncode:
                        print(out.stderr[-2000:], file=sys.stderr)
                        return 1
                    run = json.loads(out.stdout.strip().splitlines()[-1])
                    runs[tree].append(run)
                    print(round_, tree, {k: round(v, 1) for k, v in run.items()}, flush=True)
                if server is not None and round_ % 2 == 0:
                    for name, run in floor(server.url, int(n)).items():
                        runs.setdefault(name, []).append(run)
        finally:
            if server is not None:
                server.stop()
    for name, done in runs.items():
        print(f"{name}: " + "  ".join(
            f"{key} {statistics.median(r[key] for r in done):,.1f} ({min(r[key] for r in done):,.1f}-"
            f"{max(r[key] for r in done):,.1f})" for key in ("rate", "cpu_us")))
    first = runs[trees[0]]
    for tree in trees[1:]:
        ratio = statistics.median(b["rate"] / a["rate"] for a, b in zip(first, runs[tree]))
        cpu = statistics.median(b["cpu_us"] / a["cpu_us"] for a, b in zip(first, runs[tree]))
        print(f"{tree}: paired ratio against {trees[0]}: rate {ratio:.3f}, CPU per fire {cpu:.3f}")
    print("load average:", open("/proc/loadavg").read().strip())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
