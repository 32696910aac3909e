"""The shared conformance kit against a real redis-server and a real 3-master Redis Cluster."""

from __future__ import annotations

import time
from typing import Any, Callable

import pytest
import redis

from skunkqueue.testing import BackendUnderTest, ConformanceSuite


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


class TestRedisConformance(ConformanceSuite):
    @pytest.fixture
    def backend(self, redis_server: Any) -> BackendUnderTest:
        url = f"127.0.0.1:{redis_server.port}"
        return BackendUnderTest(
            name="redis", url=url, db="3", label="redis-server 7 (standalone)",
            inject_foreign=_inject_foreign(lambda: redis.Redis(port=redis_server.port, db=3)),
        )


class TestRedisClusterConformance(ConformanceSuite):
    @pytest.fixture
    def backend(self, redis_cluster: Any) -> BackendUnderTest:
        first = redis_cluster.nodes[0]
        return BackendUnderTest(
            name="redis", url=redis_cluster.url, db="0", label="Redis Cluster (3 masters)",
            inject_foreign=_inject_foreign(lambda: redis.RedisCluster(host="127.0.0.1", port=first.port)),
        )
