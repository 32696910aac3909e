"""The asyncio side on redis.asyncio (skunkqueue_redis/aio.py): same server, same options, no thread."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
import redis
import redis.asyncio.connection

from skunkqueue.errors import BackendUnavailable, ConfigurationError
from skunkqueue.record import PENDING, JobRecord, new_id
from skunkqueue.testing.looplag import LoopLag
from skunkqueue_redis.persistence import RedisPersistence

SECRET = "s3cr3t-Pa55:w@rd"
QUOTED_SECRET = "s3cr3t-Pa55%3Aw%40rd"


def record(queue: str, key: str | None = None) -> JobRecord:
    now = time.time()
    return JobRecord(id=new_id(), queue=queue, route="r", func="skunkqueue.testing.jobs:add",
                     payload=b"[[1,2],{}]", due=now, created=now, key=key)


@pytest.fixture
def queue_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def round_trip(store: RedisPersistence) -> tuple[JobRecord, Any]:
    """aenqueue then aget on a loop of its own; the record read back and that loop's client."""
    job = record(store.queue)

    async def go() -> tuple[JobRecord, Any]:
        await store.aenqueue([job])
        got = await store.aget(job.id)
        assert got is not None
        return got, (await store._side()).client

    got, client = asyncio.run(go())
    assert got.id == job.id and got.state == PENDING
    # Served by redis.asyncio, not by the thread the default methods use.
    assert "_async_executor" not in store.__dict__
    return got, client


def test_unix_socket_and_db_are_those_of_the_sync_client(redis_server: Any, queue_name: str) -> None:
    with RedisPersistence(queue_name, url=f"unix://{redis_server.unix_socket}", db="4") as store:
        got, client = round_trip(store)
        kwargs = client.connection_pool.connection_kwargs
        assert client.connection_pool.connection_class is redis.asyncio.connection.UnixDomainSocketConnection
        assert kwargs["db"] == 4
    assert redis.Redis(port=redis_server.port, db=4).exists(f"sq:{{{queue_name}}}:j:{got.id}") == 1


def test_tls_via_rediss_url(tmp_path: Path, start_redis: Callable[..., Any], free_port: int,
                            queue_name: str) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server = start_redis(extra=["--tls-port", str(free_port), "--tls-cert-file", str(cert),
                                "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                                "--tls-auth-clients", "no"])
    url = f"rediss://127.0.0.1:{free_port}?ssl_ca_certs={cert}&ssl_check_hostname=false"
    with RedisPersistence(queue_name, url=url, db="0") as store:
        got, client = round_trip(store)
        assert client.connection_pool.connection_class is redis.asyncio.connection.SSLConnection
    assert redis.Redis(port=server.port).hget(f"sq:{{{queue_name}}}:j:{got.id}", "state") == b"pending"


def test_password_in_the_url_works_and_a_refused_one_is_never_shown(start_redis: Callable[..., Any],
                                                                    queue_name: str) -> None:
    server = start_redis(password=SECRET)
    store = RedisPersistence(queue_name, url=f"redis://default:{QUOTED_SECRET}@127.0.0.1:{server.port}")
    try:
        round_trip(store)
        # The password changes under a live producer: the next loop's client is refused.
        redis.Redis(port=server.port, password=SECRET).config_set("requirepass", SECRET + "-new")
        with pytest.raises(ConfigurationError) as info:
            asyncio.run(store.aget("anything"))
        message = str(info.value)
        assert f"127.0.0.1:{server.port}" in message and "refused the credentials" in message
        assert SECRET not in message and QUOTED_SECRET not in message
    finally:
        store.client.close()


def test_server_going_away_is_backend_unavailable_quickly(start_redis: Callable[..., Any],
                                                          queue_name: str) -> None:
    server = start_redis()
    store = RedisPersistence(queue_name, url=f"127.0.0.1:{server.port}", retries=1)
    round_trip(store)
    server.kill()
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=f"127.0.0.1:{server.port}"):
        asyncio.run(store.aenqueue([record(queue_name)]))
    assert time.monotonic() - started < 5
    store.client.close()


def test_each_event_loop_gets_its_own_client(redis_server: Any, queue_name: str) -> None:
    """Loops in two threads at once, then one after the other: every call lands, on its loop's client."""
    store = RedisPersistence(queue_name, url=f"127.0.0.1:{redis_server.port}", db="4")
    clients: list[Any] = []
    errors: list[BaseException] = []

    async def fire(n: int) -> None:
        for _ in range(n):
            await store.aenqueue([record(queue_name)])
        clients.append((await store._side()).client)

    def in_thread() -> None:
        try:
            asyncio.run(fire(200))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=in_thread) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    asyncio.run(fire(100))
    assert not errors, errors
    assert len({id(c) for c in clients}) == 3
    assert store.counts() == {("r", PENDING): 500}
    store.close()


def test_close_closes_the_client_of_a_live_loop(redis_server: Any, queue_name: str) -> None:
    store = RedisPersistence(queue_name, url=f"127.0.0.1:{redis_server.port}", db="4")

    async def go() -> bool:
        await store.aenqueue([record(queue_name)])
        pool = (await store._side()).client.connection_pool
        connections = [*pool._available_connections, *pool._in_use_connections]
        assert connections and all(c.is_connected for c in connections)
        store.close()  # from inside the loop, as an app's shutdown hook would
        await asyncio.sleep(0.05)
        return not any(c.is_connected for c in connections)

    assert asyncio.run(go()), "the loop's connections stayed open after close()"


def test_a_loop_that_ends_first_closes_its_client(redis_server: Any, queue_name: str) -> None:
    store = RedisPersistence(queue_name, url=f"127.0.0.1:{redis_server.port}", db="4")
    seen: list[Any] = []

    async def go() -> None:
        await store.aenqueue([record(queue_name)])
        pool = (await store._side()).client.connection_pool
        seen.extend([*pool._available_connections, *pool._in_use_connections])

    asyncio.run(go())  # the queue is not closed: the loop's shutdown closes the client
    assert seen and not any(c.is_connected for c in seen)
    store.close()


def test_cluster_enqueues_natively_and_large_batches_whole(redis_cluster: Any, queue_name: str) -> None:
    store = RedisPersistence(queue_name, url=redis_cluster.url)
    try:
        keyed = [record(queue_name, key="once") for _ in range(3)]

        async def go() -> list[str]:
            holders = await store.aenqueue_keyed(keyed)
            assert (await store.aget(keyed[0].id)) is not None
            await store.aenqueue([record(queue_name) for _ in range(2500)])  # several script calls: MULTI/EXEC
            return holders

        assert asyncio.run(go()) == [keyed[0].id] * 3
        assert store.counts() == {("r", PENDING): 2501}
    finally:
        store.close()


def test_aresult_blocks_on_the_done_list_instead_of_polling(redis_server: Any, queue_name: str) -> None:
    from skunkqueue import Job, SkunkQueue, policy
    from skunkqueue.testing import jobs

    url = f"127.0.0.1:{redis_server.port}"
    raw = redis.Redis(port=redis_server.port, db=3)
    queue = SkunkQueue(queue_name, backend="redis", conn_url=url, dbname="3")
    finishing_at: list[float] = []

    def finish_later() -> None:  # a worker, by hand: claim now, finish a second later
        store = queue.persistence
        [claimed] = store.claim("r", "w", 30)
        time.sleep(1.0)
        # Stamped before the finish: the waiter may wake and return before this thread runs again.
        finishing_at.append(time.monotonic())
        store.finish(claimed.id, claimed.token, policy.completed(b"3"))

    async def go() -> tuple[Any, float]:
        handle = await Job(queue, jobs.add.func, ["r"]).afire(1, 2)
        raw.config_resetstat()
        worker = threading.Thread(target=finish_later)
        worker.start()
        value = await handle.aresult(timeout=10)
        returned_at = time.monotonic()
        worker.join(timeout=10)
        return value, returned_at

    try:
        value, returned_at = asyncio.run(go())
    finally:
        queue.close()
    assert value == 3
    assert returned_at - finishing_at[0] < 0.25  # woken by the finish, not by the next poll
    reads = raw.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0)
    assert reads <= 3, f"{reads} reads of the record in one second: aresult polled"


def test_aresult_says_backend_unavailable_when_the_server_dies_during_the_wait(start_redis: Callable[..., Any],
                                                                                 queue_name: str) -> None:
    from skunkqueue import Job, SkunkQueue
    from skunkqueue.testing import jobs

    server = start_redis()
    queue = SkunkQueue(queue_name, backend="redis", conn_url=f"127.0.0.1:{server.port}", retries=1)

    async def go() -> float:
        handle = await Job(queue, jobs.add.func, ["r"]).afire(1, 2)   # nobody will run it
        threading.Timer(0.5, server.kill).start()                     # the store dies mid-wait
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match=f"127.0.0.1:{server.port}"):
            await handle.aresult(timeout=30)
        return time.monotonic() - started

    try:
        assert asyncio.run(go()) < 10  # one clear error, not a hang until the timeout
    finally:
        queue.close()


def finish_all(store: RedisPersistence, count: int, stop: threading.Event) -> None:
    """A worker, by hand: claim in batches, finish each with the sum of its arguments."""
    import json

    from skunkqueue import policy

    done = 0
    while done < count and not stop.is_set():
        batch = store.claim("r", "w", 60, limit=50)
        if not batch:
            time.sleep(0.01)
            continue
        for claimed in batch:
            (first, second), _ = json.loads(claimed.payload)
            store.finish(claimed.id, claimed.token, policy.completed(str(first + second).encode()))
            done += 1


WORKER = """
import json, sys, time
from skunkqueue import policy
from skunkqueue_redis.persistence import RedisPersistence
store, left = RedisPersistence(sys.argv[1], url=sys.argv[2], db="3"), int(sys.argv[3])
time.sleep(float(sys.argv[4]))  # until every waiter waits
while left:
    batch = store.claim("r", "w", 60, limit=50)
    if not batch:
        time.sleep(0.01)
    for claimed in batch:
        (first, second), _ = json.loads(claimed.payload)
        store.finish(claimed.id, claimed.token, policy.completed(str(first + second).encode()))
        left -= 1
"""


@pytest.mark.serial  # a 50 ms bound on the loop's lag: run alone, not beside other tests' pools
def test_2000_concurrent_aresult_share_one_listener(redis_server: Any, queue_name: str) -> None:
    import gc
    import sys

    from skunkqueue import Job, SkunkQueue
    from skunkqueue.testing import jobs

    url = f"127.0.0.1:{redis_server.port}"
    raw = redis.Redis(port=redis_server.port)
    queue = SkunkQueue(queue_name, backend="redis", conn_url=url, dbname="3")
    count = 2000
    lag = LoopLag()
    clients: list[int] = []
    sampling = threading.Event()

    def sample_clients() -> None:  # beside the loop: a sync call on it would be lag of the test's making
        while not sampling.is_set():
            clients.append(len(raw.client_list()))
            time.sleep(0.05)

    async def go() -> list[int]:
        job = Job(queue, jobs.add.func, ["r"])
        handles = [await job.afire(i, 1000) for i in range(count)]
        # Started before the ticker: Popen holds the loop until the child has exec'd.
        worker = subprocess.Popen([sys.executable, "-c", WORKER, queue_name, url, str(count), "1.5"])
        ticking = asyncio.Event()
        tick = asyncio.create_task(lag.tick(ticking))
        waits = []
        for i, handle in enumerate(handles):  # as requests arrive: a hundred per turn of the loop
            waits.append(asyncio.create_task(handle.aresult(timeout=120)))
            if i % 100 == 99:
                await asyncio.sleep(0)
        try:
            values = await asyncio.gather(*waits)
        finally:
            worker.kill()
            worker.wait()
        ticking.set()
        await tick
        return values

    baseline = len(raw.client_list())
    sampler = threading.Thread(target=sample_clients)
    sampler.start()
    # The test process's heap (pytest, every module imported by the suite) left out of the
    # collector's full passes, as a latency-minded service does after start-up: a full pass
    # over it alone held the loop 50-80 ms here. Collections of what the waiters make still count.
    gc.freeze()
    try:
        values = asyncio.run(go())
    finally:
        gc.unfreeze()
        sampling.set()
        sampler.join()
        queue.close()
    assert values == [i + 1000 for i in range(count)]
    # The loop's pool (50 by default), the worker's and the sampler's: never one per waiter.
    assert max(clients) - baseline <= 55, (baseline, max(clients))
    # The loop is never held 50 ms by SkunkQueue's code; the collector's full pass over the waiters'
    # objects (28-40 ms here in the serial pass, once 52.9 ms with it counted as lag) apart.
    assert len(lag.lags) > 20 and max(lag.lags) < 0.05 and lag.longest_collection < 0.15, lag.describe()


def test_aresult_of_a_job_finished_before_the_wait_returns_at_once(redis_server: Any, queue_name: str) -> None:
    from skunkqueue import Job, SkunkQueue
    from skunkqueue.testing import jobs

    queue = SkunkQueue(queue_name, backend="redis", conn_url=f"127.0.0.1:{redis_server.port}", dbname="3")

    async def go() -> tuple[int, float]:
        handle = await Job(queue, jobs.add.func, ["r"]).afire(2, 3)
        finish_all(queue.persistence, 1, threading.Event())
        started = time.monotonic()
        return await handle.aresult(timeout=30), time.monotonic() - started

    try:
        value, took = asyncio.run(go())
    finally:
        queue.close()
    assert value == 5 and took < 1.0


def test_aresult_hears_a_finish_after_its_subscription_is_killed(redis_server: Any, queue_name: str) -> None:
    from skunkqueue import Job, SkunkQueue
    from skunkqueue.testing import jobs

    raw = redis.Redis(port=redis_server.port)
    queue = SkunkQueue(queue_name, backend="redis", conn_url=f"127.0.0.1:{redis_server.port}", dbname="3")

    async def go() -> tuple[list[int], float]:
        job = Job(queue, jobs.add.func, ["r"])
        handles = [await job.afire(i, 1) for i in range(20)]
        waits = [asyncio.create_task(h.aresult(timeout=30)) for h in handles]
        await asyncio.sleep(0.3)
        assert raw.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 1  # the listener's connection
        finish_all(queue.persistence, 20, threading.Event())
        finished = time.monotonic()
        values = await asyncio.gather(*waits)
        return values, time.monotonic() - finished

    try:
        values, late = asyncio.run(go())
    finally:
        queue.close()
    assert values == [i + 1 for i in range(20)]
    assert late < 2.0, f"results came {late:.1f} s after the finishes"


def test_a_spent_pool_says_so_and_how_to_grow_it(redis_server: Any, queue_name: str) -> None:
    with RedisPersistence(queue_name, url=f"redis://127.0.0.1:{redis_server.port}/3?max_connections=1") as store:
        held = store.client.connection_pool.get_connection()
        try:
            with pytest.raises(BackendUnavailable) as caught:
                store.get("nothing")
        finally:
            store.client.connection_pool.release(held)
    message = str(caught.value)
    assert "pool" in message and "max_connections" in message and "Cannot reach" not in message, message


def test_max_connections_option_sizes_the_async_pool(redis_server: Any, queue_name: str) -> None:
    url = f"127.0.0.1:{redis_server.port}"
    with RedisPersistence(queue_name, url=url, max_connections=7) as store:
        _, client = round_trip(store)
        assert client.connection_pool.max_connections == 7
    with RedisPersistence(queue_name, url=f"redis://{url}/0?max_connections=9") as store:
        _, client = round_trip(store)
        assert client.connection_pool.max_connections == 9
    with RedisPersistence(queue_name, url=url) as store:
        _, client = round_trip(store)
        assert client.connection_pool.max_connections == 50
    with pytest.raises(ConfigurationError, match="max_connections"):
        RedisPersistence(queue_name, url=url, max_connections=0)
