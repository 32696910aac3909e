"""Flow control on MongoDB, beside the kit's FlowControlSuite: what makes the claim race-free."""

from __future__ import annotations

import random
import threading
import time
import uuid
from typing import Any

import pytest
from pymongo import ASCENDING, MongoClient

import skunkqueue_mongo.persistence as mongo_persistence
from skunkqueue import flow, policy
from skunkqueue.persistence import LEASE_LOST, LEASE_OK
from skunkqueue.record import PENDING
from skunkqueue.testing.suite_flow import most_in_window
from skunkqueue.testing.suite_support import make_record
from skunkqueue_mongo.persistence import MongoPersistence

KEY = '["f", "t{1}:$."]'


def _limited(queue: str, **fields: Any) -> Any:
    return make_record(queue, "r", limit_key=KEY, **fields)


def _slow_counts(store: MongoPersistence) -> None:
    """Widen the window between counting a key's live leases and taking the record, as a loaded
    machine or a GC pause would: without the slot's unique index, every racer counts 0 and wins."""
    count = store._live

    def slow(query: dict[str, Any], field: str) -> tuple[list[dict[str, Any]], set[str]]:
        found = count(query, field)
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
    # Its pool comes back (a SIGSTOP ends) and renews: refused, or two would run on a key limited to one.
    assert store.renew("w1", [(first.id, first.token)], 30) == {first.id: LEASE_LOST}
    assert store.renew("w2", [(second.id, second.token)], 30) == {second.id: LEASE_OK}
    assert store.finish(second.id, second.token, policy.completed(b"1"))
    assert "flow_slot" not in store.jobs.find_one({"_id": second.id})
    # Housekeeping hands the lapsed record back through a finish, which drops the mark with the lease.
    assert store.finish(first.id, first.token, policy.lease_lost(first))
    back = store.jobs.find_one({"_id": first.id})
    assert back["state"] == PENDING and "slot_lost" not in back and "flow_slot" not in back
    [again] = store.claim("r", "w3", 30, limit=5)
    assert again.id == first.id and store.renew("w3", [(again.id, again.token)], 30) == {again.id: LEASE_OK}


def test_a_slot_left_on_a_record_that_is_not_running_is_taken_back(mongo: Any, opened: Any,
                                                                     queue_name: str) -> None:
    # The claim reads the running holders of a key's slots, and frees a slot (one more round trip)
    # only when a lapsed one holds it. A slot on a record in another state (a foreign write, a
    # finish from an older version) is found by the unique index instead: the claim must sweep it
    # then, not give up on the key.
    store = opened(queue_name, mongo.url)
    stray, record = _limited(queue_name, limit_concurrency=1), _limited(queue_name, limit_concurrency=1)
    store.enqueue([stray, record])
    store.jobs.update_one({"_id": stray.id}, {"$set": {"state": "complete", "flow_slot": f"{KEY}#0"},
                                              "$unset": {"lease_until": ""}})
    [taken] = store.claim("r", "w1", 30, limit=1)
    assert taken.id == record.id
    assert store.jobs.find_one({"_id": record.id})["flow_slot"] == f"{KEY}#0"
    assert "flow_slot" not in store.jobs.find_one({"_id": stray.id})


def test_a_lapsed_lease_whose_slot_nobody_took_is_still_renewed(mongo: Any, opened: Any, queue_name: str) -> None:
    store = opened(queue_name, mongo.url)
    store.enqueue([_limited(queue_name, limit_concurrency=2) for _ in range(2)])
    [first] = store.claim("r", "w1", 0.3, limit=1)
    time.sleep(0.5)
    # A slow pool, not a lost one: the slot is still its own, as on every backend.
    assert store.renew("w1", [(first.id, first.token)], 30) == {first.id: LEASE_OK}
    [second] = store.claim("r", "w2", 30, limit=5)
    assert store.jobs.find_one({"_id": second.id})["flow_slot"] == f"{KEY}#1"
    assert store.claim("r", "w3", 30, limit=5) == []


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
    ok, _, grant, _ = store._grant("k:x", 10.0, burst)
    assert ok
    store._ungrant([grant])
    # Given back: the next start is allowed again, as if the first never happened.
    assert store._grant("k:x", 10.0, burst)[0]


def test_stored_starts_keep_the_rate_however_late_the_claim_follows_its_grant(
        mongo_standalone: Any, opened: Any, queue_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A loaded machine puts a varying delay between the rate's grant and the record's claim. Stamped
    # with the claim's own time, a start granted late-but-claimed-at-once lands next to one granted
    # early-but-claimed-late, and the stored starts break the rate they were granted under.
    stores = [opened(queue_name, mongo_standalone.url) for _ in range(3)]
    rng = random.Random(5)
    for store in stores:
        grant = store._grant

        def late(*args: Any, _grant: Any = grant) -> Any:
            found = _grant(*args)
            time.sleep(rng.choice([0.0, 0.0, 0.08]))
            return found

        monkeypatch.setattr(store, "_grant", late)
    interval, burst, jobs = 0.1, 2, 30
    route_interval = 0.05  # a route rate too: both must hold for the stored starts
    stores[0].put_setting(flow.limit_setting("r"), flow.RouteLimit(rate=flow.Rate(20, 1.0)).to_json())
    stores[0].enqueue([_limited(queue_name, limit_interval=interval, limit_burst=burst) for _ in range(jobs)])
    taken: list[float] = []
    gate = threading.Barrier(len(stores))

    def claim(store: MongoPersistence, worker: str) -> None:
        gate.wait()
        deadline = time.monotonic() + 30
        while len(taken) < jobs and time.monotonic() < deadline:
            taken.extend(r.started or 0.0 for r in store.claim("r", worker, 30, limit=2))
            time.sleep(0.005)

    threads = [threading.Thread(target=claim, args=(s, f"w{n}")) for n, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(taken) == jobs
    for window in (0.15, 0.25, 0.5, 1.0):
        assert most_in_window(taken, window) <= burst + window / interval + 1e-6, window
        assert most_in_window(taken, window) <= 1 + window / route_interval + 1e-6, window


def test_records_stored_before_priorities_get_the_default_at_start_up(mongo_standalone: Any, opened: Any,
                                                                      queue_name: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    db = f"upgrade_{uuid.uuid4().hex[:8]}"
    with MongoClient(mongo_standalone.url) as client:
        jobs = client[db]["jobs"]
        # What the version before priorities left: its claim index, and records without a priority.
        jobs.create_index([("queue", ASCENDING), ("route", ASCENDING), ("state", ASCENDING), ("target", ASCENDING),
                           ("due", ASCENDING), ("_id", ASCENDING)], name="claim")
        old = make_record(queue_name, due=time.time() - 60).to_dict()
        old["_id"] = old.pop("id")
        del old["priority"]
        jobs.insert_one(old)
        monkeypatch.setattr(mongo_persistence, "_indexed", set())
        store = opened(queue_name, mongo_standalone.url, db=db)
        assert "claim" not in jobs.index_information() and "claim_priority" in jobs.index_information()
        assert jobs.find_one({"_id": old["_id"]})["priority"] == 0
        newer = make_record(queue_name)
        store.enqueue([newer])
        assert [r.id for r in store.claim("r", "w", 30)] == [old["_id"]], "the older record lost its place"
        client.drop_database(db)
