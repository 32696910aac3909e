"""Workflows on Redis: what release.lua leaves in the store, and a server restart mid-workflow."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import redis

from skunkqueue import dependencies, policy
from skunkqueue.backends import open_backend
from skunkqueue.persistence import Persistence
from skunkqueue.testing.suite_support import make_record
from skunkqueue_redis.keys import Keys


@pytest.fixture
def store(url: str, queue_name: str) -> Iterator[Persistence]:
    backend = open_backend(queue_name, "redis", url=url, db="5")
    yield backend
    backend.close()


def _complete(store: Persistence, job_id: str) -> None:
    """Claim (the oldest due record: the test's next one) and complete ``job_id``."""
    [claimed] = store.claim("r", "w", 30)
    assert claimed.id == job_id
    assert store.finish(job_id, claimed.token, policy.completed(b"1"))


def test_a_plain_finish_touches_no_workflow_key_and_a_released_one_leaves_none_behind(
        store: Persistence, raw: redis.Redis, queue_name: str) -> None:
    keys = Keys(queue_name)
    settled = keys.base + "settled:"
    plain = make_record(queue_name)
    store.enqueue([plain])
    _complete(store, plain.id)
    assert not raw.exists(keys.deps(plain.id), settled + plain.id)
    assert raw.hget(keys.job(plain.id), "has_deps") is None
    a, b = make_record(queue_name), make_record(queue_name)
    c = make_record(queue_name, parents=[a.id, b.id], due=dependencies.WAITING_DUE)
    store.enqueue([a, b, c])
    assert raw.hget(keys.job(a.id), "has_deps") == b"1"
    _complete(store, a.id)
    assert raw.hgetall(settled + c.id) == {a.id.encode(): b"complete"}
    assert raw.hget(keys.job(c.id), "wait_left") == b"1"
    _complete(store, b.id)
    # Released: its set and count are gone; each parent's dependents set expires with the parent.
    assert not raw.exists(settled + c.id) and raw.hget(keys.job(c.id), "wait_left") is None
    for parent in (a, b):
        assert 0 < raw.pttl(keys.deps(parent.id)) <= raw.pttl(keys.job(parent.id)) + 1000
    _complete(store, c.id)
    assert not raw.exists(settled + c.id, keys.deps(c.id))


def test_a_workflow_survives_a_server_restart(start_redis: Any, queue_name: str) -> None:
    server = start_redis(extra=["--appendonly", "yes", "--appendfsync", "always"])
    url = f"127.0.0.1:{server.port}"
    with open_backend(queue_name, "redis", url=url) as store:
        a, b = make_record(queue_name), make_record(queue_name)
        c = make_record(queue_name, parents=[a.id, b.id], due=dependencies.WAITING_DUE)
        store.enqueue([a, b, c])
        _complete(store, a.id)
    server.stop()  # SIGTERM: the append-only file has every acknowledged write (appendfsync always)
    server.start()
    with open_backend(queue_name, "redis", url=url) as store:
        assert [r.id for r in store.claim("r", "w", 30, limit=10)] == [b.id], "c was released early"
        got = store.get(b.id)
        assert got is not None and store.finish(b.id, got.token, policy.completed(b"2"))
        assert [r.id for r in store.claim("r", "w", 30, limit=10)] == [c.id]
        assert store.claim("r", "w", 30, limit=10) == []
