"""Flow control on MongoDB, beside the kit's FlowControlSuite: what makes the claim race-free."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from skunkqueue import flow, policy
from skunkqueue.testing.suite_support import make_record
from skunkqueue_mongo.persistence import MongoPersistence

KEY = '["f", "t{1}:$."]'


def _limited(queue: str, **fields: Any) -> Any:
    return make_record(queue, "r", limit_key=KEY, **fields)


def _slow_counts(store: MongoPersistence) -> None:
    """Widen the window between counting a key's live leases and taking the record, as a loaded
    machine or a GC pause would: without the slot's unique index, every racer counts 0 and wins."""
    count = store._live

    def slow(query: dict[str, Any]) -> list[dict[str, Any]]:
        found = count(query)
        time.sleep(0.05)
        return found

    store._live = slow  # type: ignore[method-assign]


def _race(stores: list[MongoPersistence], claims: int = 4) -> list[Any]:
    won: list[Any] = []
    gate = threading.Barrier(len(stores))

    def claim(store: MongoPersistence, worker: str) -> None:
        gate.wait()
        for _ in range(claims):
            won.extend(store.claim("r", worker, 30, limit=2))

    threads = [threading.Thread(target=claim, args=(s, f"w{n}")) for n, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return won


def test_slow_racing_claims_take_no_more_slots_than_the_limit(mongo: Any, opened: Any, queue_name: str) -> None:
    stores = [opened(queue_name, mongo.url) for _ in range(6)]
    for store in stores:
        _slow_counts(store)
    # Each racer has records of its own (broadcast to it), so that no two of them contend for one
    # record: only the key's limit stands between them.
    stores[0].enqueue([_limited(queue_name, limit_concurrency=2, target=f"w{n % 6}") for n in range(30)])
    won = _race(stores)
    assert len(won) == 2, f"{len(won)} claims won a key limited to 2 slots"
    assert sorted(r.id for r in won) == sorted({r.id for r in won})


def test_a_lapsed_slot_is_taken_over_and_the_finish_drops_it(mongo: Any, opened: Any, queue_name: str) -> None:
    store = opened(queue_name, mongo.url)
    store.enqueue([_limited(queue_name, limit_concurrency=1) for _ in range(2)])
    [first] = store.claim("r", "w1", 0.5, limit=5)
    assert store.jobs.find_one({"_id": first.id})["flow_slot"] == f"{KEY}#0"
    time.sleep(0.8)  # its lease runs out: the slot is free, though the record is still running
    [second] = store.claim("r", "w2", 30, limit=5)
    assert store.jobs.find_one({"_id": second.id})["flow_slot"] == f"{KEY}#0"
    lapsed = store.jobs.find_one({"_id": first.id})
    assert lapsed["state"] == "running" and "flow_slot" not in lapsed
    assert store.finish(second.id, second.token, policy.completed(b"1"))
    assert "flow_slot" not in store.jobs.find_one({"_id": second.id})


def test_racing_rate_grants_never_exceed_the_burst(mongo: Any, opened: Any, queue_name: str) -> None:
    stores = [opened(queue_name, mongo.url) for _ in range(6)]
    stores[0].enqueue([_limited(queue_name, limit_interval=60.0, limit_burst=3) for _ in range(30)])
    won = _race(stores)
    # Never more than the burst. Fewer is allowed: a racer that lost the record it was granted a
    # start for gives the start back only if nobody was charged since (see _ungrant).
    assert 1 <= len(won) <= 3, f"{len(won)} starts within one interval of a rate with burst 3"
    mine = [opened(queue_name + "-own", mongo.url) for _ in range(6)]
    mine[0].enqueue([_limited(queue_name + "-own", limit_interval=60.0, limit_burst=3, target=f"w{n % 6}")
                     for n in range(30)])
    won = _race(mine)  # each racer with records of its own: no start is lost to a lost record
    assert len(won) == 3, f"{len(won)} starts within one interval of a rate with burst 3"
    times = mine[0].rate_times([flow.key_tat(KEY)])
    assert times[flow.key_tat(KEY)] > mine[0].now() + 60  # three charged: 3 intervals ahead of the first


@pytest.mark.parametrize("burst", [1, 2])
def test_a_grant_given_back_when_the_record_was_taken(mongo: Any, opened: Any, queue_name: str, burst: int) -> None:
    store = opened(queue_name, mongo.url)
    ok, _, grant = store._grant("k:x", 10.0, burst)
    assert ok
    store._ungrant([grant])
    # Given back: the next start is allowed again, as if the first never happened.
    assert store._grant("k:x", 10.0, burst)[0]
