"""Idempotency keys, settings and throughput counters on Redis: what the conformance kit cannot see.

The kit checks the promises (one record per key, settings, counters adding up);
these tests look at the keys the backend leaves in Redis, at names that could
break the layout, at concurrent writers and at a server killed mid-stream.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import pytest
import redis

import skunkqueue_redis.persistence as redis_persistence
from skunkqueue import policy
from skunkqueue.backends import open_backend
from skunkqueue.metrics import RETENTION, RouteMinute
from skunkqueue.record import COMPLETE, JobRecord
from skunkqueue.testing.suite_keys import keys_through_a_restart
from skunkqueue.testing.suite_support import make_record
from skunkqueue_redis.persistence import RedisPersistence

# Names that look like the layout's own separators, escapes and Cluster hash tags.
HOSTILE = ["k:{1}", "}{", "{", "%3A", "a:b", "a%3Ab", "é \x00 ü", '["r", "x"]']


def record(queue: str, key: str | None = None, route: str = "r", **fields: Any) -> JobRecord:
    return make_record(queue, route, key=key, **fields)


@contextmanager
def opened(url: str, queue: str, db: str = "5", **options: Any) -> Iterator[RedisPersistence]:
    store = open_backend(queue, "redis", url=url, db=db, **options)
    assert isinstance(store, RedisPersistence)
    try:
        yield store
    finally:
        store.close()


# == idempotency keys =============================================================================


def test_the_key_round_trips_and_a_held_key_returns_its_holder(url: str, queue_name: str) -> None:
    with opened(url, queue_name) as store:
        firsts = [record(queue_name, key) for key in HOSTILE]
        assert store.enqueue_keyed(firsts) == [r.id for r in firsts]
        again = [record(queue_name, key) for key in reversed(HOSTILE)]
        assert store.enqueue_keyed(again) == [r.id for r in reversed(firsts)]
        for first in firsts:
            got = store.get(first.id)
            assert got is not None and got.key == first.key and got.to_dict() == first.to_dict()
        assert all(store.get(r.id) is None for r in again)
        assert sorted(r.key or "" for r in store.list_jobs()) == sorted(HOSTILE)
        claimed = store.claim("r", "w", 10, limit=100)
        assert {r.key for r in claimed} == set(HOSTILE)


def test_the_key_string_lives_and_expires_with_its_holder(url: str, raw: redis.Redis, queue_name: str) -> None:
    with opened(url, queue_name, result_ttl=1.0) as store:
        job = record(queue_name, "invoice-7")
        store.enqueue_keyed([job])
        key_string = store.keys.key_prefix + "invoice-7"
        assert raw.get(key_string) == job.id.encode() and raw.ttl(key_string) == -1
        [claimed] = store.claim("r", "w", 10)
        assert store.finish(claimed.id, claimed.token, policy.completed(b"1"))
        assert 0 < raw.pttl(key_string) <= 1000 and raw.pttl(store.keys.job(job.id)) > 0
        assert store.enqueue_keyed([record(queue_name, "invoice-7")]) == [job.id]  # finished: still held
        # Put back to pending (a requeue): the key string must not expire under a live record.
        assert store.finish(job.id, claimed.token, policy.requeue(claimed), expect=COMPLETE)
        assert raw.ttl(key_string) == -1
        time.sleep(1.3)
        assert store.enqueue_keyed([record(queue_name, "invoice-7")]) == [job.id]
        [claimed] = store.claim("r", "w", 10)
        assert store.finish(claimed.id, claimed.token, policy.completed(b"2"))
        time.sleep(1.3)
        assert raw.exists(key_string, store.keys.job(job.id)) == 0
        fresh = record(queue_name, "invoice-7")
        assert store.enqueue_keyed([fresh]) == [fresh.id]


def test_a_purged_holder_frees_its_key_and_its_string(url: str, raw: redis.Redis, queue_name: str) -> None:
    with opened(url, queue_name) as store:
        job = record(queue_name, "once")
        store.enqueue_keyed([job])
        assert store.purge("r") == 1
        assert raw.exists(store.keys.key_prefix + "once") == 0
        fresh = record(queue_name, "once")
        assert store.enqueue_keyed([fresh]) == [fresh.id]


def test_a_stale_or_foreign_key_string_blocks_nothing(url: str, raw: redis.Redis, queue_name: str) -> None:
    with opened(url, queue_name) as store:
        prefix = store.keys.key_prefix
        other = record(queue_name, "other")
        store.enqueue_keyed([other])
        raw.set(prefix + "a", "no-such-record")       # the holder is gone
        raw.set(prefix + "b", other.id)               # the holder holds another key
        raw.set(store.keys.job("not-a-hash"), "x")
        raw.set(prefix + "c", "not-a-hash")           # the holder's name is not a hash at all
        fresh = [record(queue_name, k) for k in "abc"]
        assert store.enqueue_keyed(fresh) == [r.id for r in fresh]
        assert [raw.get(prefix + k) for k in "abc"] == [r.id.encode() for r in fresh]
        assert store.enqueue_keyed([record(queue_name, "other")]) == [other.id]


@pytest.mark.parametrize("where", ["standalone", "cluster"])
def test_one_key_twice_in_a_batch_of_several_script_calls(request: pytest.FixtureRequest, where: str,
                                                          queue_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if where == "cluster":
        server_url, db = request.getfixturevalue("redis_cluster").url, "0"
    else:
        server_url, db = f"127.0.0.1:{request.getfixturevalue('redis_server').port}", "5"
    monkeypatch.setattr(redis_persistence, "ENQUEUE_CHUNK", 3)  # ten records: four calls in one MULTI
    with opened(server_url, queue_name, db=db) as store:
        keys = ["a", "b", "a", "c", None, "a", "b", "e", None, "c"]
        batch = [record(queue_name, k) for k in keys]
        holders = store.enqueue_keyed(batch)
        first: dict[str, str] = {}
        for r in batch:
            if r.key is not None:
                first.setdefault(r.key, r.id)
        assert holders == [first[r.key] if r.key is not None else r.id for r in batch]
        assert len(store.list_jobs()) == 6


def test_keyed_records_settings_and_counters_stay_in_the_queue_slot(redis_cluster: Any, queue_name: str) -> None:
    with opened(redis_cluster.url, queue_name + "{x}", db="0") as store:
        jobs = [record(store.queue, key, route=key) for key in HOSTILE]
        assert store.enqueue_keyed(jobs) == [r.id for r in jobs]
        assert store.enqueue_keyed([record(store.queue, HOSTILE[0])]) == [jobs[0].id]
        store.put_setting("periodic:{x}", "1")
        store.add_stats([RouteMinute(key, int(time.time() // 60), {"completed": 1}) for key in HOSTILE])
        client = redis.RedisCluster(host="127.0.0.1", port=redis_cluster.nodes[0].port)
        try:
            keys = [k for k in client.keys("sq:*", target_nodes=redis.RedisCluster.ALL_NODES)
                    if k.startswith(store.keys.base.encode())]
            assert len(keys) >= 2 * len(HOSTILE) + 3
            assert len({client.cluster_keyslot(k) for k in keys}) == 1, keys
        finally:
            client.close()


def test_a_server_killed_mid_stream_keeps_one_record_per_key(start_redis: Any, queue_name: str) -> None:
    # appendfsync always: an acknowledged enqueue is on disk, so after kill -9 every key
    # whose holder was reported must still be held by that very record.
    server = start_redis(extra=["--appendonly", "yes", "--appendfsync", "always"])

    def restart() -> None:
        server.kill()  # SIGKILL, mid-stream
        time.sleep(3.0)  # longer than the backend's own retries, so some calls fail
        server.start()

    run = keys_through_a_restart(lambda: open_backend(queue_name, "redis", url=f"127.0.0.1:{server.port}", db="0"),
                                 restart, calls_each_side=100)
    assert run.refused > 0, "the producers should have seen the server gone"


# == settings =======================================================================================


def test_settings_keep_names_and_values_exactly_per_queue(url: str, queue_name: str) -> None:
    with opened(url, queue_name) as store, opened(url, queue_name + "-other") as other:
        names = HOSTILE + [""]
        for i, name in enumerate(names):
            store.put_setting(name, f"value {i} é\n")
        store.put_setting("empty", "")
        assert [store.get_setting(name) for name in names] == [f"value {i} é\n" for i in range(len(names))]
        assert store.get_setting("empty") == "" and store.get_setting("never") is None
        assert all(other.get_setting(name) is None for name in names)
        store.put_setting(HOSTILE[0], None)
        store.put_setting(HOSTILE[0], None)  # deleting twice is fine
        assert store.get_setting(HOSTILE[0]) is None and store.get_setting(HOSTILE[1]) == "value 1 é\n"


# == throughput counters ============================================================================


def test_counters_keep_hostile_route_names_apart(url: str, queue_name: str) -> None:
    minute = int(time.time() // 60)
    with opened(url, queue_name) as store:
        store.add_stats([RouteMinute(route, minute, {"completed": i + 1, "b3": 1}) for i, route in enumerate(HOSTILE)])
        got = {s.route: s.counts for s in store.stats(minute)}
        assert got == {route: {"completed": i + 1, "b3": 1} for i, route in enumerate(HOSTILE)}


def test_counters_expire_and_old_minutes_are_not_kept(url: str, raw: redis.Redis, queue_name: str) -> None:
    now = time.time()
    minute = int(now // 60)
    with opened(url, queue_name) as store:
        store.add_stats([RouteMinute("r", minute, {"completed": 1}),
                         RouteMinute("r", int((now - RETENTION) // 60) - 2, {"completed": 1})])
        assert [s.minute for s in store.stats(0)] == [minute]
        left = raw.ttl(store.keys.minute(minute))
        assert RETENTION - 60 < left <= RETENTION + 120
        assert raw.zrange(store.keys.stats, 0, -1) == [str(minute).encode()]


def test_counters_added_at_once_by_many_clients_add_up(url: str, queue_name: str) -> None:
    minute = int(time.time() // 60)
    rounds, clients = 200, 4

    def add() -> None:
        with opened(url, queue_name) as store:
            for _ in range(rounds):
                store.add_stats([RouteMinute("r", minute, {"completed": 1, "duration_us": 3})])

    threads = [threading.Thread(target=add) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    with opened(url, queue_name) as store:
        [sample] = store.stats(minute)
    assert sample.counts == {"completed": rounds * clients, "duration_us": 3 * rounds * clients}
