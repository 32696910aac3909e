"""Idle fire -> result of one system, with CPU per round trip: ``python -m benchmarks.idle_latency NAME [N]``.

NAME is a system of ``benchmarks.peer_systems`` (skunkqueue, huey, ...), in its latency set-up; each run
starts its own redis-server and worker command. Prints the fastest, p10, p25, p50 and p99 round trip
and the CPU per round trip of the producer (this process), of the worker command's processes and of
redis-server. For A/B runs, alternate two checkouts (``PYTHONPATH=OLD/skunkqueue-core/src:...``).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import redis

from benchmarks.common import compile_sources, cpu_seconds, percentile
from benchmarks.peer_systems import PEERS
from benchmarks.peers import _tree, _Worker
from benchmarks.servers import RedisServer


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name, n = argv[0], int(argv[1]) if len(argv) > 1 else 300
    compile_sources()
    peer = PEERS[name]()
    with tempfile.TemporaryDirectory() as logdir, RedisServer() as server:
        assert isinstance(server, RedisServer)
        peer.open(server.url, latency=True)
        worker = _Worker(peer, server.url, True, Path(logdir))
        client = redis.Redis.from_url(server.url)
        try:
            for i in range(5):  # warm up: the worker's start, imports, connections
                worker.alive()
                peer.wait(peer.fire(i))
            tree = _tree(worker.process.pid)
            cpu = client.info("cpu")
            before = (time.process_time(), sum(cpu_seconds(p) for p in tree),
                      cpu["used_cpu_sys"] + cpu["used_cpu_user"])
            samples = []
            for i in range(n):
                time.sleep(0.02)
                start = time.perf_counter()
                value = peer.wait(peer.fire(i))
                samples.append(time.perf_counter() - start)
                if value != i:
                    raise SystemExit(f"{name}: wrong result {value!r} for {i}")
            cpu = client.info("cpu")
            after = (time.process_time(), sum(cpu_seconds(p) for p in tree),
                     cpu["used_cpu_sys"] + cpu["used_cpu_user"])
        finally:
            client.close()
            worker.stop()
            peer.close()
    producer, work, server_cpu = (1e6 * (a - b) / n for a, b in zip(after, before))
    ms = {p: 1000 * percentile(samples, p) for p in (10, 25, 50, 99)}
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    print(f"{name}: fastest {1000 * min(samples):.3f} p10 {ms[10]:.3f} p25 {ms[25]:.3f} p50 {ms[50]:.3f} "
          f"p99 {ms[99]:.3f} ms; CPU per round trip: producer {producer:.0f} us, worker command {work:.0f} us, "
          f"redis-server {server_cpu:.0f} us; load average {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
