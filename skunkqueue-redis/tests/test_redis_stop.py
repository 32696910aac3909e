"""An idle Redis worker stops promptly when its pool is stopped.

An idle worker waits for work in a BLPOP of up to a second, and a signal does
not cut that short (the worker only sets a flag); before the pool woke its
stopping workers through the store, every graceful stop of an idle pool took
up to a second more, and every test that stops a pool paid it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from skunkqueue.backends import open_backend

STOP_BOUND = 0.5  # seconds from SIGTERM to the pool's exit


def skunq() -> str:
    return str(Path(sys.executable).parent / "skunq")


def blocked_in_blpop(client: redis.Redis, pid_of_pool: int) -> bool:
    """Some client of the server is blocked in a BLPOP (the only one here: the idle worker)."""
    return any(c.get("cmd") == "blpop" and "b" in c.get("flags", "") for c in client.client_list())


def stop_once(url: str, queue_name: str, cwd: Path) -> float:
    client = redis.Redis.from_url(url)
    store = open_backend(queue_name, "redis", url=url)
    pool = subprocess.Popen([skunq(), "work", "-q", queue_name, "-r", "r", "--backend", "redis", "--url", url,
                             "--log-level", "WARNING"], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (store.workers() and blocked_in_blpop(client, pool.pid)):
            assert pool.poll() is None, pool.stderr.read() if pool.stderr else ""
            assert time.monotonic() < deadline, "the worker never started waiting for work"
            time.sleep(0.02)
        # The worker is blocked in a fresh BLPOP with most of its second still to run.
        started = time.monotonic()
        os.kill(pool.pid, signal.SIGTERM)
        pool.wait(30)
        took = time.monotonic() - started
        assert pool.returncode == 0, pool.stderr.read() if pool.stderr else ""
        assert store.workers() == [], "a graceful stop unregisters the worker"
        return took
    finally:
        if pool.poll() is None:
            pool.kill()
            pool.wait()
        store.close()
        client.close()


@pytest.mark.serial
def test_an_idle_redis_worker_stops_within_half_a_second(redis_server: Any, queue_name: str,
                                                         tmp_path: Path) -> None:
    # Two stops, the quicker one counts: one start-up on a loaded machine should not decide it,
    # and without the wake-up both take at least the rest of the BLPOP (most of a second).
    took = [stop_once(redis_server.url, f"{queue_name}{i}", tmp_path) for i in range(2)]
    assert min(took) < STOP_BOUND, f"graceful stops of an idle pool took {took} s"


def test_a_wake_up_nobody_takes_expires(redis_server: Any, queue_name: str) -> None:
    """The token for a worker that stopped without waiting again expires: worker ids are never
    reused, so a list named after one would otherwise stay in Redis for good. And it wakes only
    that worker: another worker's wait on the same route still blocks."""
    store = open_backend(queue_name, "redis", url=redis_server.url)
    client = redis.Redis.from_url(redis_server.url)
    try:
        store.wake_worker("r", "gone:1:r:abc")
        keys = list(client.scan_iter(match=f"*{queue_name}*"))
        assert len(keys) == 1 and client.llen(keys[0]) == 1
        assert 0 < client.pttl(keys[0]) <= 10_000
        started = time.monotonic()
        store.wait_for_work("r", "other:2:r:def", 0.3)
        assert time.monotonic() - started >= 0.25, "the token woke a worker it was not for"
        started = time.monotonic()
        store.wait_for_work("r", "gone:1:r:abc", 5)
        assert time.monotonic() - started < 2, "the token did not wake the worker it was for"
    finally:
        store.close()
        client.close()
