"""The shared conformance kit against a real redis-server and a real 3-master Redis Cluster."""

from __future__ import annotations

import time
from typing import Any, Callable

import pytest
import redis

from skunkqueue.testing import BackendUnderTest, ConformanceSuite
from skunkqueue_redis.codec import decode_record
from skunkqueue_redis.keys import Keys


def _inject_foreign(client_factory: Callable[[], Any]) -> Callable[[str, str], None]:
    def inject(queue: str, route: str) -> None:
        # What another program could leave where the route's jobs live: an id
        # in the due set whose key is a string, one whose hash is not a job,
        # one with an unknown state, and one with no key at all.
        base = f"sq:{{{queue}}}:"
        client = client_factory()
        now = time.time() - 1
        client.set(base + "j:foreign-string", "hello")
        client.hset(base + "j:foreign-hash", mapping={"state": "pending", "token": "x"})
        client.hset(base + "j:foreign-state", mapping={"state": "weird", "id": "foreign-state"})
        client.hset(base + "j:foreign-nofunc", mapping={"state": "pending", "id": "foreign-nofunc"})
        client.zadd(base + f"d:{route}", {"foreign-string": now, "foreign-hash": now, "foreign-state": now,
                                          "foreign-nofunc": now, "foreign-missing": now})
        client.close()

    return inject


def _misfile(client_factory: Callable[[], Any]) -> Callable[[str, str, str, str, str | None], None]:
    def misfile(queue: str, job_id: str, to_queue: str, route: str, target: str | None) -> None:
        # The record's hash is copied as it is: only where its id is filed changes.
        source, dest, client = Keys(queue), Keys(to_queue), client_factory()
        fields = client.hgetall(source.job(job_id))
        record = decode_record(fields, job_id)
        client.zrem(source.due(record.route, record.target), job_id)
        if to_queue != queue:
            client.hset(dest.job(job_id), mapping=fields)
            client.delete(source.job(job_id))
            client.zrem(source.index, job_id)
            client.zadd(dest.index, {job_id: "+inf"})
        client.zadd(dest.due(route, target), {job_id: record.due})
        client.rpush(dest.notify(route, target), "1")
        client.close()

    return misfile


class TestRedisConformance(ConformanceSuite):
    @pytest.fixture
    def backend(self, redis_server: Any) -> BackendUnderTest:
        url = f"127.0.0.1:{redis_server.port}"
        return BackendUnderTest(
            name="redis", url=url, db="3", label="redis-server 7 (standalone)",
            inject_foreign=_inject_foreign(lambda: redis.Redis(port=redis_server.port, db=3)),
            misfile=_misfile(lambda: redis.Redis(port=redis_server.port, db=3)),
        )


class TestRedisClusterConformance(ConformanceSuite):
    @pytest.fixture
    def backend(self, redis_cluster: Any) -> BackendUnderTest:
        first = redis_cluster.nodes[0]
        return BackendUnderTest(
            name="redis", url=redis_cluster.url, db="0", label="Redis Cluster (3 masters)",
            inject_foreign=_inject_foreign(lambda: redis.RedisCluster(host="127.0.0.1", port=first.port)),
            misfile=_misfile(lambda: redis.RedisCluster(host="127.0.0.1", port=first.port)),
        )
