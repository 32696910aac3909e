"""Idempotency keys, settings and throughput counters on MongoDB: what the conformance kit cannot see.

The kit checks the promises; these tests look at the documents and indexes,
at a holder past its expiry that the TTL monitor has not deleted yet, at
concurrent writers and at a server killed mid-stream.
"""

from __future__ import annotations

import signal
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from skunkqueue import policy
from skunkqueue.metrics import RETENTION, RouteMinute
from skunkqueue.record import JobRecord
from skunkqueue.testing.suite import make_record
from skunkqueue.testing.suite_keys import keys_through_a_restart
from skunkqueue_mongo.persistence import MongoPersistence

DB = "skunkqueue_backend_tests"  # the `opened` fixture's (conftest.py)
# Names that are field paths or operators elsewhere in MongoDB.
HOSTILE = ["a.b", "$x", "é \x00 ü", "", '["r", "x"]', "{}"]


def keyed(queue: str, key: str | None) -> JobRecord:
    record = make_record(queue)
    record.key = key
    return record


# == idempotency keys =============================================================================


def test_the_key_index_is_unique_per_queue_and_leaves_unkeyed_records_out(mongo: Any, opened: Any,
                                                                          queue_name: str) -> None:
    store, other = opened(queue_name, mongo.url), opened(queue_name + "-b", mongo.url)
    index = store.jobs.index_information()["key"]
    assert index["key"] == [("queue", 1), ("key", 1)] and index["unique"]
    assert index["partialFilterExpression"] == {"key": {"$type": "string"}}
    plain = [keyed(queue_name, None) for _ in range(20)]
    firsts = [keyed(queue_name, k) for k in HOSTILE]
    assert store.enqueue_keyed(plain + firsts) == [r.id for r in plain + firsts]
    elsewhere = keyed(other.queue, HOSTILE[0])
    assert other.enqueue_keyed([elsewhere]) == [elsewhere.id]  # another queue: its own keys
    again = [keyed(queue_name, k) for k in HOSTILE]
    assert store.enqueue_keyed(again) == [r.id for r in firsts]
    for first in firsts:
        got = store.get(first.id)
        assert got is not None and got.to_dict() == first.to_dict()
    assert store.jobs.count_documents({"queue": queue_name}) == len(plain) + len(firsts)


def test_a_holder_past_its_expiry_frees_the_key_before_the_ttl_monitor_runs(mongo: Any, opened: Any,
                                                                           queue_name: str) -> None:
    store = opened(queue_name, mongo.url, result_ttl=3600)
    old = keyed(queue_name, "nightly")
    store.enqueue_keyed([old])
    [claimed] = store.claim("r", "w", 10)
    assert store.finish(claimed.id, claimed.token, policy.completed(b"1"))
    assert store.enqueue_keyed([keyed(queue_name, "nightly")]) == [old.id]  # finished, not expired
    # Expired a second ago; the TTL monitor (once a minute) has not deleted it.
    past = datetime.now(timezone.utc) - timedelta(seconds=1)
    store.jobs.update_one({"_id": old.id}, {"$set": {"expire_at": past}})
    racers = 8
    holders: list[str] = []
    ready = threading.Barrier(racers)

    def race() -> None:
        mine = opened(queue_name, mongo.url)
        record = keyed(queue_name, "nightly")
        ready.wait()
        holders.extend(mine.enqueue_keyed([record]))

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(holders) == racers and len(set(holders)) == 1 and old.id not in holders
    assert [d["_id"] for d in store.jobs.find({"queue": queue_name, "key": "nightly"})] == holders[:1]


def test_a_holder_with_a_live_expiry_keeps_its_key(mongo: Any, opened: Any, queue_name: str) -> None:
    store = opened(queue_name, mongo.url)
    old = keyed(queue_name, "k")
    store.enqueue_keyed([old])
    soon = datetime.now(timezone.utc) + timedelta(seconds=30)
    store.jobs.update_one({"_id": old.id}, {"$set": {"state": "complete", "expire_at": soon}})
    assert store.enqueue_keyed([keyed(queue_name, "k")]) == [old.id]


def test_one_key_twice_in_one_batch(mongo: Any, opened: Any, queue_name: str) -> None:
    store = opened(queue_name, mongo.url)
    keys = ["a", "b", "a", None, "a", "b", None]
    batch = [keyed(queue_name, k) for k in keys]
    first: dict[str, str] = {}
    for record in batch:
        if record.key is not None:
            first.setdefault(record.key, record.id)
    assert store.enqueue_keyed(batch) == [first[r.key] if r.key is not None else r.id for r in batch]
    assert store.jobs.count_documents({"queue": queue_name}) == 4


def test_a_server_killed_mid_stream_keeps_one_record_per_key(make_mongo: Callable[..., Any]) -> None:
    server = make_mongo(replset=True)

    def restart() -> None:
        server.stop(sig=signal.SIGKILL)
        time.sleep(1.0)
        server.start()

    run = keys_through_a_restart(lambda: MongoPersistence("keys-restart", url=server.url, db=DB), restart)
    # The kill was felt: a call either waited for the server or was refused.
    assert run.refused or run.slowest > 0.5


# == settings =======================================================================================


def test_settings_keep_names_and_values_exactly_per_queue(mongo: Any, opened: Any, queue_name: str) -> None:
    store, other = opened(queue_name, mongo.url), opened(queue_name + "-b", mongo.url)
    for i, name in enumerate(HOSTILE):
        store.put_setting(name, f"value {i} é\n")
    store.put_setting("empty", "")
    assert [store.get_setting(name) for name in HOSTILE] == [f"value {i} é\n" for i in range(len(HOSTILE))]
    assert store.get_setting("empty") == "" and store.get_setting("never") is None
    assert all(other.get_setting(name) is None for name in HOSTILE)
    store.put_setting(HOSTILE[0], "last writer wins")
    assert store.get_setting(HOSTILE[0]) == "last writer wins"
    store.put_setting(HOSTILE[0], None)
    store.put_setting(HOSTILE[0], None)  # deleting twice is fine
    assert store.get_setting(HOSTILE[0]) is None and store.get_setting(HOSTILE[1]) == "value 1 é\n"


# == throughput counters ============================================================================


def test_counters_keep_hostile_route_names_apart_and_expire(mongo: Any, opened: Any, queue_name: str) -> None:
    store = opened(queue_name, mongo.url)
    now = time.time()
    minute = int(now // 60)
    store.add_stats([RouteMinute(route, minute, {"completed": i + 1, "b3": 1}) for i, route in enumerate(HOSTILE)])
    store.add_stats([RouteMinute("r", int((now - RETENTION) // 60) - 2, {"completed": 1})])  # too old: dropped
    got = {(s.route, s.minute): s.counts for s in store.stats(0)}
    assert got == {(route, minute): {"completed": i + 1, "b3": 1} for i, route in enumerate(HOSTILE)}
    assert store.stats_docs.index_information()["stats_expire"]["expireAfterSeconds"] == 0
    for doc in store.stats_docs.find({"queue": queue_name}):
        left = doc["expire_at"].replace(tzinfo=timezone.utc).timestamp() - now
        assert RETENTION - 60 < left <= RETENTION + 120


def test_counters_added_at_once_by_many_clients_add_up(mongo: Any, opened: Any, queue_name: str) -> None:
    minute = int(time.time() // 60)
    rounds, clients = 100, 4
    stores = [opened(queue_name, mongo.url) for _ in range(clients)]
    start = threading.Barrier(clients)

    def add(store: MongoPersistence) -> None:
        start.wait()
        for _ in range(rounds):
            # Two routes per call: a fresh minute's documents are upserted by every client at once.
            store.add_stats([RouteMinute("r", minute, {"completed": 1, "duration_us": 3}),
                             RouteMinute("s", minute, {"failed": 1})])

    threads = [threading.Thread(target=add, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    got = {s.route: s.counts for s in stores[0].stats(minute)}
    total = rounds * clients
    assert got == {"r": {"completed": total, "duration_us": 3 * total}, "s": {"failed": total}}
