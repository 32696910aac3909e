"""Flow control on Redis, beside the kit's FlowControlSuite: the layout the scripts keep."""

from __future__ import annotations

import time
from typing import Any, Iterator

import pytest
import redis

from skunkqueue import flow, policy
from skunkqueue.backends import open_backend
from skunkqueue.persistence import LEASE_OK
from skunkqueue.record import Outcome
from skunkqueue.testing.suite_support import make_record
from skunkqueue_redis import scripts
from skunkqueue_redis.keys import Keys
from skunkqueue_redis.persistence import RedisPersistence

KEY = '["f", "t{1}:$."]'


@pytest.fixture
def store(url: str, queue_name: str) -> Iterator[RedisPersistence]:
    backend = open_backend(queue_name, "redis", url=url, db="5")
    assert isinstance(backend, RedisPersistence)
    yield backend
    backend.close()


def _limited(queue: str) -> Any:
    return make_record(queue, "r", limit_key=KEY, limit_concurrency=1)


def test_the_scripts_spell_flow_names_as_flow_does() -> None:
    common = scripts.read("common")
    claim = scripts.read("claim")
    assert f"'{flow.limit_setting('')}'" in common and f"'{flow.pause_setting('')}'" in common
    assert f"'{flow.key_tat('')}' .. limit_key" in claim and f"'{flow.route_tat('')}' .. route" in claim


def test_a_slot_follows_the_lease_in_claim_renew_and_finish(store: RedisPersistence, raw: redis.Redis,
                                                           queue_name: str) -> None:
    keys = Keys(queue_name)
    store.enqueue([_limited(queue_name), _limited(queue_name)])
    [held] = store.claim("r", "w", 5.0, limit=5)
    slots = raw.zrange(keys.slots(KEY), 0, -1, withscores=True)
    running = raw.zrange(keys.tally("r", "running"), 0, -1, withscores=True)
    assert slots == running == [(held.id.encode(), pytest.approx(held.lease_until, abs=1e-5))]
    assert store.renew("w", [(held.id, held.token)], 60.0) == {held.id: LEASE_OK}
    renewed = store.get(held.id)
    assert renewed is not None and renewed.lease_until is not None
    assert raw.zscore(keys.slots(KEY), held.id) == pytest.approx(renewed.lease_until, abs=1e-5)
    assert raw.zscore(keys.tally("r", "running"), held.id) == pytest.approx(renewed.lease_until, abs=1e-5)
    assert store.finish(held.id, held.token, policy.completed(b"1"))
    assert raw.zcard(keys.slots(KEY)) == 0
    [nxt] = store.claim("r", "w", 5.0, limit=5)
    assert raw.zrange(keys.slots(KEY), 0, -1) == [nxt.id.encode()]


def test_an_idle_worker_on_a_blocked_key_waits_and_a_finish_wakes_it(store: RedisPersistence,
                                                                    queue_name: str) -> None:
    store.enqueue([_limited(queue_name) for _ in range(3)])
    [held] = store.claim("r", "w1", 30.0, limit=5)
    claims = 0
    started = time.monotonic()
    while time.monotonic() - started < 1.5:  # a worker's loop: claim, and wait when it got nothing
        claims += 1
        assert store.claim("r", "w2", 30.0, limit=5) == []
        store.wait_for_work("r", "w2", timeout=0.5)
    # Were the held-back records reported "due now", this loop would spin thousands of times.
    assert claims <= 5, f"{claims} claims in 1.5 s on a blocked key: the worker spins"
    assert store.finish(held.id, held.token, policy.completed(b"1"))
    began = time.monotonic()
    store.wait_for_work("r", "w2", timeout=5.0)
    assert time.monotonic() - began < 2.5, "the finish that freed the slot did not wake the waiter"
    assert len(store.claim("r", "w2", 30.0, limit=5)) == 1


def test_priority_levels_are_dropped_when_empty_and_purged(store: RedisPersistence, raw: redis.Redis,
                                                           queue_name: str) -> None:
    keys = Keys(queue_name)
    store.enqueue([make_record(queue_name, priority=3), make_record(queue_name, priority=-2),
                   make_record(queue_name)])
    assert sorted(raw.zrange(keys.levels("r"), 0, -1)) == [b"-2", b"3"]
    assert raw.zcard(keys.level_due("r", 3)) == 1
    assert [r.priority for r in store.claim("r", "w", 30.0, limit=1)] == [3]
    assert [r.priority for r in store.claim("r", "w", 30.0, limit=5)] == [0, -2]
    assert raw.zcard(keys.levels("r")) == 0, "emptied priority levels stay listed"
    store.enqueue([make_record(queue_name, priority=9) for _ in range(3)])
    assert store.purge("r") == 3
    assert raw.zcard(keys.level_due("r", 9)) == 0


def test_a_retry_keeps_its_priority(store: RedisPersistence, queue_name: str) -> None:
    store.enqueue([make_record(queue_name, priority=4), make_record(queue_name)])
    [first] = store.claim("r", "w", 30.0, limit=1)
    assert first.priority == 4
    assert store.finish(first.id, first.token, Outcome(state="pending", due=time.time() - 1))
    assert [r.id for r in store.claim("r", "w", 30.0, limit=2)][0] == first.id


def test_a_claim_pages_past_many_blocked_records(store: RedisPersistence, queue_name: str) -> None:
    # More blocked records than one page of the claim holds, then free ones, across two priorities.
    blocked = [_limited(queue_name) for _ in range(60)]
    free = [make_record(queue_name) for _ in range(5)]
    low = [make_record(queue_name, priority=-1) for _ in range(3)]
    store.enqueue([*blocked, *free, *low])
    assert [r.id for r in store.claim("r", "w", 30.0, limit=3)] == [blocked[0].id, free[0].id, free[1].id]
    assert [r.id for r in store.claim("r", "w", 30.0, limit=10)] == [r.id for r in free[2:] + low]
    assert store.claim("r", "w", 30.0, limit=10) == []


def test_a_broadcasts_priority_levels_are_its_workers_own_and_purged_with_it(
        store: RedisPersistence, raw: redis.Redis, queue_name: str) -> None:
    keys = Keys(queue_name)
    store.enqueue([make_record(queue_name, target="w{1}:", priority=4) for _ in range(2)]
                  + [make_record(queue_name, target="v", priority=-2), make_record(queue_name, priority=4)])
    assert raw.zrange(keys.levels("r", "w{1}:"), 0, -1) == [b"4"]
    assert raw.zcard(keys.level_due("r", 4, "w{1}:")) == 2 and raw.zcard(keys.level_due("r", 4)) == 1
    # A dead worker's broadcasts are purged by target (housekeeping), priorities included.
    assert store.purge("r", target="w{1}:") == 2
    assert raw.zcard(keys.level_due("r", 4, "w{1}:")) == 0
    assert [r.priority for r in store.claim("r", "v", 30.0, limit=5)] == [4, -2]
    assert raw.zcard(keys.levels("r", "v")) == 0, "an emptied level of a worker stays listed"
    store.enqueue([make_record(queue_name, target="u", priority=7), make_record(queue_name, priority=7)])
    assert store.purge("r") == 2
