"""Flow control on MongoDB, beside the kit's FlowControlSuite: what makes the claim race-free."""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from pymongo import ASCENDING, MongoClient, monitoring

import skunkqueue_mongo.persistence as mongo_persistence
from skunkqueue import flow, policy
from skunkqueue.persistence import LEASE_LOST, LEASE_OK
from skunkqueue.record import PENDING
from skunkqueue.testing.suite_flow import intervals, most_at_once, most_in_window, read_stamps
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


# -- a route's own limit: decided once per claim (_RouteView) -----------------------------------


def _route_limit(store: MongoPersistence, concurrency: int | None = None, rate: str | None = None,
                 burst: int | None = None, route: str = "r") -> None:
    store.put_setting(flow.limit_setting(route), flow.make_route_limit(concurrency, rate, burst).to_json())  # type: ignore[union-attr]


def _stamp(path: Path, what: str, job_id: str) -> None:
    """One line appended to a file outside the queue (one write: lines of racing threads never mix)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{what} {job_id} {time.time():.6f} {threading.get_ident()}\n".encode())
    finally:
        os.close(fd)


def test_racing_claimers_never_run_more_than_a_route_limit_of_two(mongo: Any, opened: Any, queue_name: str,
                                                                  tmp_path: Path) -> None:
    stores = [opened(queue_name, mongo.url) for _ in range(5)]
    for store in stores:
        _slow_counts(store)  # every racer counts the route's slots, then waits before it claims
    _route_limit(stores[0], concurrency=2)
    jobs = 40
    stores[0].enqueue([make_record(queue_name, "r") for _ in range(jobs)])
    log = tmp_path / "stamps"
    gate = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def work(store: MongoPersistence, worker: str) -> None:
        try:
            gate.wait()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                records = store.claim("r", worker, 30, limit=3)
                if not records:
                    if stores[0].counts().get(("r", "complete"), 0) >= jobs:
                        return
                    time.sleep(0.01)
                    continue
                # A claimed record runs from its claim to its finish (a worker's prefetch holds its
                # slot as well): stamped so, outside the queue.
                for record in records:
                    _stamp(log, "start", record.id)
                time.sleep(0.03)
                for record in records:
                    _stamp(log, "end", record.id)
                    assert store.finish(record.id, record.token, policy.completed(b"1"))
        except BaseException as exc:  # pragma: no cover - shown below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s, f"w{n}")) for n, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert not errors, errors
    runs = [(start, end) for _, start, end, _ in intervals(read_stamps(log))]
    assert len(runs) == jobs, f"{len(runs)} of {jobs} jobs ran"
    assert most_at_once(runs) <= 2, f"{most_at_once(runs)} runs at once on a route limited to 2"
    assert most_at_once(runs) == 2, "the route's two slots were never both used"
    assert stores[0].jobs.count_documents({"queue": queue_name, "route_slot": {"$exists": True}}) == 0


def test_a_lapsed_route_slot_is_taken_over_and_its_holder_may_not_renew(mongo: Any, opened: Any,
                                                                         queue_name: str) -> None:
    store = opened(queue_name, mongo.url)
    _route_limit(store, concurrency=1)
    store.enqueue([make_record(queue_name, "r") for _ in range(3)])
    [first] = store.claim("r", "w1", 0.5, limit=5)
    assert store.jobs.find_one({"_id": first.id})["route_slot"] == "r#0"
    assert store.claim("r", "w2", 30, limit=5) == []
    time.sleep(0.8)  # its lease runs out: the slot is free, though the record is still running
    [second] = store.claim("r", "w2", 30, limit=5)
    assert store.jobs.find_one({"_id": second.id})["route_slot"] == "r#0"
    assert "route_slot" not in store.jobs.find_one({"_id": first.id})
    assert store.renew("w1", [(first.id, first.token)], 30) == {first.id: LEASE_LOST}
    assert store.claim("r", "w3", 30, limit=5) == []


def test_a_route_limit_counts_the_head_and_the_keyed_records_together(mongo: Any, opened: Any,
                                                                      queue_name: str) -> None:
    # Records at the head are taken by the sorted update; behind a keyed record the claim goes on
    # record by record. Both take their slots and starts from the claim's one view of the route.
    store = opened(queue_name, mongo.url)
    _route_limit(store, concurrency=3, rate="1000/s", burst=100)
    # In claim order (due, then id: both from the time each is made): a plain, two keyed, three plain.
    records = [make_record(queue_name, "r"), *(_limited(queue_name, limit_concurrency=1) for _ in range(2)),
               *(make_record(queue_name, "r") for _ in range(3))]
    plain, keyed = [records[0], *records[3:]], records[1:3]
    store.enqueue(records)
    taken = store.claim("r", "w", 30, limit=10)
    assert [r.id for r in taken] == [plain[0].id, keyed[0].id, plain[1].id]
    slots = {store.jobs.find_one({"_id": r.id})["route_slot"] for r in taken}
    assert slots == {"r#0", "r#1", "r#2"}
    assert len({r.started for r in taken}) == 1, "one claim's starts are decided at one time"
    assert store.claim("r", "w", 30, limit=10) == []
    assert store.finish(taken[0].id, taken[0].token, policy.completed(b"1"))
    assert [r.id for r in store.claim("r", "w", 30, limit=10)] == [plain[2].id]  # keyed[1]: its key is full


def test_starts_granted_and_not_used_go_back_to_the_rate_but_never_more(mongo: Any, opened: Any,
                                                                        queue_name: str) -> None:
    store = opened(queue_name, mongo.url)
    _route_limit(store, rate="1/s", burst=5)  # 5 at once, then one a second
    store.enqueue([make_record(queue_name, "r") for _ in range(2)])
    began = time.monotonic()
    first = store.claim("r", "w", 30, limit=16)  # the claim is granted 5 starts and uses 2
    assert len(first) == 2
    store.enqueue([make_record(queue_name, "r") for _ in range(20)])
    second = store.claim("r", "w", 30, limit=16)
    third = store.claim("r", "w", 30, limit=16)
    waited = time.monotonic() - began
    # Without the give-back the rate would stay charged for 5 starts: no start for a second more.
    assert 3 <= len(second) <= 3 + int(waited), (len(second), waited)
    assert len(first) + len(second) + len(third) <= 5 + int(waited), "more starts than the rate allows"
    starts = [r.started or 0.0 for r in first + second + third]
    deadline = time.monotonic() + 10
    while len(starts) < 8 and time.monotonic() < deadline:
        starts += [r.started or 0.0 for r in store.claim("r", "w", 30, limit=16)]
        time.sleep(0.05)
    assert len(starts) >= 8, "the rate stopped starting jobs"
    for window in (0.5, 1.0, 2.0, 3.0):
        assert most_in_window(starts, window) <= 5 + window / 1.0 + 1e-6, window


def test_racing_claims_share_a_route_rate_and_never_exceed_it(mongo: Any, opened: Any, queue_name: str) -> None:
    stores = [opened(queue_name, mongo.url) for _ in range(6)]
    _route_limit(stores[0], rate="1/m", burst=4)
    stores[0].enqueue([make_record(queue_name, "r", target=f"w{n % 6}") for n in range(30)])
    won = _race(stores)
    # Each claim asks for 2: racers granted starts they do not all use give them back unless
    # another racer was charged since (fewer starts, never more).
    assert 1 <= len(won) <= 4, f"{len(won)} starts of a rate allowing 4 at once"


class _Dies:
    """The jobs collection of a claimer that dies on its claim's update: before the update reaches
    the server (``applied`` False) or after it is applied, with the reply lost."""

    def __init__(self, jobs: Any, applied: bool) -> None:
        self._jobs, self._applied = jobs, applied

    def __getattr__(self, name: str) -> Any:
        return getattr(self._jobs, name)

    def find_one_and_update(self, *args: Any, **kwargs: Any) -> Any:
        if self._applied:
            self._jobs.find_one_and_update(*args, **kwargs)
        raise SystemExit("the claimer died")


@pytest.mark.parametrize("applied", [False, True])
def test_a_claimer_dying_between_grant_and_update_leaves_no_slot_and_no_extra_start(
        mongo: Any, opened: Any, queue_name: str, applied: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    dying, other = opened(queue_name, mongo.url), opened(queue_name, mongo.url)
    _route_limit(dying, concurrency=2, rate="1/m", burst=3)
    dying.enqueue([make_record(queue_name, "r") for _ in range(6)])
    given_back: list[Any] = []
    monkeypatch.setattr(dying, "_ungrant", lambda *args: given_back.append(args))  # a dead process gives nothing back
    monkeypatch.setattr(dying, "jobs", _Dies(dying.jobs, applied))
    with pytest.raises(SystemExit):
        dying.claim("r", "dead", 0.5, limit=5)
    slotted = list(other.jobs.find({"queue": queue_name, "route_slot": {"$exists": True}}))
    if not applied:
        assert slotted == [], "a claim that never wrote its record holds a slot"
        assert other.jobs.count_documents({"queue": queue_name, "state": "pending"}) == 6
    else:
        assert len(slotted) == 1 and slotted[0]["state"] == "running"
    # The rate stays charged for the starts the dead claim was granted (the 2 its slots allowed):
    # they are lost, never given to anyone twice. One of the burst of 3 is left.
    taken = other.claim("r", "w", 30, limit=5)
    assert 1 <= len(taken) <= 2 - len(slotted)
    assert other.claim("r", "w", 30, limit=5) == []
    if applied:  # the dead claimer's record holds its slot until its lease runs out, and no longer
        time.sleep(0.8)
        assert other.jobs.count_documents({"queue": queue_name, "route_slot": {"$exists": True}}) == 2
        assert other.renew("dead", [(slotted[0]["_id"], slotted[0]["token"])], 30) == {
            slotted[0]["_id"]: LEASE_OK}, "a late renewal of a slot nobody took is still its own"


class _Commands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.counts[event.command_name] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


@pytest.mark.parametrize("kind", ["concurrency and rate", "rate", "concurrency"])
def test_a_route_limit_not_reached_costs_few_commands_per_job(mongo: Any, opened: Any, queue_name: str,
                                                              kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers claiming 8 at a time (as a worker's prefetch does) and finishing each: with a route
    limit far from reached, about the plain claim's one update per record, and the route's count
    and rate once per claim. (Per record, as before: 3 findAndModify and 1.1 find a job.)"""
    listener = _Commands()
    monkeypatch.setattr(mongo_persistence, "MongoClient", partial(MongoClient, event_listeners=[listener]))
    stores = [opened(queue_name, mongo.url) for _ in range(2)]
    limits = {"concurrency and rate": (10_000, "1000000/s"), "rate": (None, "1000000/s"),
              "concurrency": (10_000, None)}[kind]
    _route_limit(stores[0], *limits)
    jobs = 240
    stores[0].enqueue([make_record(queue_name, "r") for _ in range(jobs)])
    listener.counts.clear()
    done, turn = 0, 0
    while done < jobs:
        store = stores[turn % 2]
        turn += 1
        records = store.claim("r", f"w{turn % 2}", 30, limit=8)
        assert records or turn < 1000, "nothing to claim"
        for record in records:
            assert store.finish(record.id, record.token, policy.completed(b"1"))
        done += len(records)
    per_job = {name: count / jobs for name, count in listener.counts.items()}
    assert per_job.get("findAndModify", 0) <= 2.2, per_job
    assert per_job.get("find", 0) <= 0.5, per_job
    assert per_job.get("update", 0) <= 0.05, per_job  # no starts given back: none was left unused
