"""Idle waits and housekeeping on the fdb STAND-IN (not a real FoundationDB), with its faults armed.

Real watches may fire with no change or with an error, and a database allows
10,000 of them: an idle worker must back off rather than spin. Housekeeping
and purge must read record fields, not payload or result chunks. Skipped with
a real cluster (the faults are the stand-in's).
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import fdb_servers as servers
import pytest

from skunkqueue import flow, policy
from skunkqueue.persistence import Persistence
from skunkqueue.record import JobRecord, new_id
from skunkqueue.testing import BackendUnderTest

pytestmark = pytest.mark.skipif(bool(servers.REAL_CLUSTER_FILE),
                                reason="faults are injected into the stand-in only; this run uses a real cluster")


@pytest.fixture
def store(standin_cluster: Any, fdb_root: str, faults: Any) -> Iterator[Persistence]:
    backend = BackendUnderTest(name="fdb", url=standin_cluster.cluster_file, db=fdb_root, options={"result_ttl": 0.2})
    persistence = backend.open(backend.new_queue_name())
    yield persistence
    persistence.close()


def _record(queue: str, payload: bytes = b"[[1,2],{}]", due: float | None = None) -> JobRecord:
    now = time.time()
    return JobRecord(id=new_id(), queue=queue, route="r", func="skunkqueue.testing.jobs:add",
                     payload=payload, due=now - 1 if due is None else due, created=now)


@pytest.mark.parametrize("setting", [
    {"spurious_watch_rate": 1.0},                                   # fires, nothing changed
    {"spurious_watch_rate": 1.0, "spurious_watch_error": 1009},     # fires with an error
    {"watch_limit": 0}])                                            # too_many_watches (1032)
def test_idle_wait_backs_off_instead_of_spinning(store: Persistence, faults: Any, setting: dict[str, Any]) -> None:
    faults.configure(**setting)
    before = faults.stats["requests"]
    started = time.monotonic()
    store.wait_for_work("r", "w", 2.0)
    assert 1.9 < time.monotonic() - started < 3.0  # nothing arrived: it waited its time
    # Backing off 0.05, 0.1, 0.2 ... 1 s: a handful of rounds of a few requests each, not thousands
    # (each round also reads the route's priority levels; a fire is checked in the next round's
    # transaction, not one of its own).
    assert faults.stats["requests"] - before < 60, faults.stats


def test_an_empty_claim_reads_the_routes_flow_settings_once_a_second(store: Persistence, faults: Any) -> None:
    # An idle worker claims once per round: the paused flag and the route's limit are read once per
    # flow.SETTINGS_TTL (a change still takes effect within it), not by every claim.
    store.claim("r", "w", 30.0)
    before = faults.stats["requests"]
    started = time.monotonic()
    for _ in range(20):
        assert store.claim("r", "w", 30.0) == []
    rereads = 1 + int((time.monotonic() - started) / flow.SETTINGS_TTL)
    # An empty claim: a read version, the due and priority-level ranges, the commit (5 requests);
    # reading both settings each time made it 7 (140 for the 20).
    assert faults.stats["requests"] - before <= 20 * 5 + 2 * rereads, faults.stats


def test_work_still_wakes_an_idle_worker_among_spurious_fires(store: Persistence, faults: Any) -> None:
    import threading

    faults.configure(spurious_watch_rate=0.5)
    threading.Timer(0.5, lambda: store.enqueue([_record(store.queue)])).start()
    started = time.monotonic()
    store.wait_for_work("r", "w", 10.0)
    assert time.monotonic() - started < 2.5
    assert len(store.claim("r", "w", 30)) == 1


def test_purge_and_expiry_read_fields_not_chunks(store: Persistence, monkeypatch: Any) -> None:
    big = b"x" * 500_000  # six chunks of payload, and as much result
    records = [_record(store.queue, payload=big) for _ in range(3)]
    store.enqueue(records)
    [claimed] = store.claim("r", "w", 30)
    assert store.finish(claimed.id, claimed.token, policy.completed(big))
    full_reads: list[str] = []
    read = store._read  # type: ignore[attr-defined]
    monkeypatch.setattr(store, "_read", lambda tr, job_id: full_reads.append(job_id) or read(tr, job_id))
    assert store.purge("r") == 2
    time.sleep(0.3)  # past result_ttl
    store.delete_expired(time.time())
    assert store.get(claimed.id) is None and store.counts() == {}
    assert full_reads == [claimed.id], "only get() read the whole record"


def test_list_jobs_pages_by_bytes_and_keeps_records_whole(store: Persistence, monkeypatch: Any) -> None:
    import fdb.impl

    from skunkqueue_fdb import persistence as module

    monkeypatch.setattr(module, "SCAN_PAGE_BYTES", 400_000)
    pages: list[int] = []
    get_range = fdb.impl.TransactionRead.get_range

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        rows = get_range(self, *args, **kwargs)
        pages.append(sum(len(kv.key) + len(kv.value) for kv in rows))
        return rows

    big = [_record(store.queue, payload=bytes([n]) * 250_000) for n in range(12)]  # 3 chunks each
    small = [_record(store.queue) for _ in range(40)]
    store.enqueue(big[:6])
    store.enqueue(small)
    store.enqueue(big[6:])
    monkeypatch.setattr(fdb.impl.TransactionRead, "get_range", counting)
    listed = {r.id: r for r in store.list_jobs()}
    assert set(listed) == {r.id for r in big + small}
    assert all(listed[r.id].payload == r.payload for r in big + small)  # no record cut between pages
    # The first page is at most 20 values; each later one aims at 400 kB and overshoots by one page's
    # estimate at most (the whole queue holds about 3 MB).
    assert len(pages) > 3 and max(pages) < 2_000_000, pages


@pytest.mark.parametrize("error", [None, 1009])
def test_waiting_for_a_result_backs_off_on_spurious_fires(store: Persistence, faults: Any,
                                                          error: int | None) -> None:
    import threading

    record = _record(store.queue)
    store.enqueue([record])
    [claimed] = store.claim("r", "w", 30)
    faults.configure(spurious_watch_rate=1.0, spurious_watch_error=error)
    threading.Timer(1.5, lambda: store.finish(record.id, claimed.token, policy.completed(b"3"))).start()
    before = faults.stats["requests"]
    started = time.monotonic()
    done = store.wait_finished(record.id, 10.0)
    assert done is not None and done.result == b"3"
    assert 1.4 < time.monotonic() - started < 3.5
    assert faults.stats["requests"] - before < 60, faults.stats


def _idle_waiters(store: Persistence, n: int, timeout: float) -> tuple[list[Any], dict[str, float]]:
    import threading

    woke: dict[str, float] = {}

    def wait(i: int) -> None:
        store.wait_for_work("r", f"w{i}", timeout)
        woke[f"w{i}"] = time.monotonic()

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    import fdb

    idle = store.space["idle"].range()  # type: ignore[attr-defined]
    entries = fdb.transactional(lambda tr: len(list(tr.get_range(idle.start, idle.stop))))
    deadline = time.monotonic() + 10
    while entries(store._db) < n and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.02)  # until every one of them is idle and watching
    time.sleep(0.1)
    return threads, woke


def test_new_work_wakes_one_idle_worker_not_all(store: Persistence) -> None:
    threads, woke = _idle_waiters(store, 8, 6.0)

    def settle(expected: int) -> None:
        deadline = time.monotonic() + 3
        while len(woke) < expected and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # any further wake-up would show by now
        assert len(woke) == expected, woke

    store.enqueue([_record(store.queue)])
    settle(1)
    store.enqueue([_record(store.queue) for _ in range(3)])
    settle(4)
    targeted = _record(store.queue)
    targeted.target = next(f"w{i}" for i in range(8) if f"w{i}" not in woke)
    store.enqueue([targeted])
    settle(5)
    assert targeted.target in woke
    for t in threads:
        t.join(10)


def test_no_job_slips_past_workers_going_idle(store: Persistence, faults: Any) -> None:
    """A job enqueued just as workers go idle still wakes one, long before their 5 s idle timeout.

    One job at a time, each fired a random 0-15 ms after the last was claimed:
    that is when its claimer goes back to idle, the moment a wake-up could be lost.
    """
    import random
    import threading

    faults.configure(request_latency_ms=1, commit_latency_ms=2)  # wider windows for the race
    claimed = threading.Event()
    stop = threading.Event()

    def worker(i: int) -> None:
        n = 0
        while not stop.is_set():
            got = store.claim("r", f"w{i}", 30)
            if got:
                claimed.set()
            else:
                # A new name each time: its first idle entry races the producer, as a new worker's does.
                n += 1
                store.wait_for_work("r", f"w{i}-{n}", 5.0)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    slowest = 0.0
    try:
        for _ in range(120):
            time.sleep(random.random() * 0.015)
            claimed.clear()
            fired = time.monotonic()
            store.enqueue([_record(store.queue)])
            assert claimed.wait(3.0), "a wake-up was lost: the job waited for an idle timeout"
            slowest = max(slowest, time.monotonic() - fired)
    finally:
        stop.set()
        store.enqueue([_record(store.queue) for _ in range(2)])  # wake both to let them stop
        for t in threads:
            t.join(10)
    assert slowest < 1.0, slowest


@pytest.mark.parametrize("skew", [-30.0, 30.0])
def test_a_producer_with_a_skewed_clock_still_wakes_an_idle_worker(store: Persistence, monkeypatch: Any,
                                                                   skew: float) -> None:
    from skunkqueue_fdb import persistence as module

    threads, woke = _idle_waiters(store, 1, 4.0)
    record = _record(store.queue)
    real = time.time
    monkeypatch.setattr(module.time, "time", lambda: real() + skew)  # the producer's clock only matters here
    started = time.monotonic()
    store.enqueue([record])
    monkeypatch.setattr(module.time, "time", real)
    threads[0].join(5)
    assert "w0" in woke and woke["w0"] - started < 1.0, (woke, started)
