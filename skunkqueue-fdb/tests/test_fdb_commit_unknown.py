"""Every protocol step of the fdb backend under the commit failures a real cluster shows.

A commit can apply and still fail with commit_unknown_result (1021), or time
out during commit (1031) having applied or not; a read can fail as too old
(1007). These are injected into the STAND-IN (tests/fdb_standin, not a real
FoundationDB: faults cannot be injected into a real cluster from here, so this
file is skipped when SKUNKQUEUE_FDB_CLUSTER_FILE is set). Each step must then
apply exactly once and report what it did.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import fdb_servers as servers
import pytest

from skunkqueue import policy
from skunkqueue.persistence import LEASE_OK, Persistence
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import COMPLETE, PENDING, RUNNING, JobRecord, Outcome, new_id
from skunkqueue.testing import BackendUnderTest, jobs
from skunkqueue.testing.suite import wait_until
from skunkqueue.testing.workers import PoolProcess

pytestmark = pytest.mark.skipif(bool(servers.REAL_CLUSTER_FILE),
                                reason="faults are injected into the stand-in only; this run uses a real cluster")

JOBS = 100
COMMIT_FAULTS = ["apply_then_1021", "fail_then_1021", "apply_then_1031", "fail_then_1031"]


@pytest.fixture
def backend(standin_cluster: Any, fdb_root: str) -> BackendUnderTest:
    return BackendUnderTest(name="fdb", url=standin_cluster.cluster_file, db=fdb_root, env=servers.standin_env(),
                            label=servers.STANDIN_LABEL)


@pytest.fixture
def store(backend: BackendUnderTest, faults: Any) -> Iterator[Persistence]:
    persistence = backend.open(backend.new_queue_name())
    yield persistence
    persistence.close()


def _record(queue: str) -> JobRecord:
    now = time.time() - 1
    return JobRecord(id=new_id(), queue=queue, route="r", func="skunkqueue.testing.jobs:add",
                     payload=b"[[1,2],{}]", due=now, created=now)


def _due_entries(backend: BackendUnderTest, queue: str) -> list[tuple[Any, ...]]:
    import fdb

    due = fdb.Subspace((backend.db, queue))["due"]
    kvs = fdb.transactional(lambda tr: list(tr.get_range(due.range().start, due.range().stop)))(
        fdb.open(backend.url))
    return [due.unpack(kv.key) for kv in kvs]


def _arm(faults: Any, kind: str, record: JobRecord) -> Any:
    # The next commit that writes this record's keys, and only that one.
    return faults.inject(kind, key_contains=record.id, times=1)


@pytest.mark.parametrize("kind", COMMIT_FAULTS)
class TestEachStepAppliesOnce:
    def test_enqueue(self, backend: BackendUnderTest, store: Persistence, faults: Any, kind: str) -> None:
        record = _record(store.queue)
        rule = _arm(faults, kind, record)
        store.enqueue([record])
        assert rule.fired == 1
        assert store.counts() == {("r", PENDING): 1}
        assert [entry[-1] for entry in _due_entries(backend, store.queue)] == [record.id]
        assert [r.id for r in store.claim("r", "w", 30, limit=5)] == [record.id]
        assert store.claim("r", "w", 30) == []

    def test_enqueue_keyed(self, backend: BackendUnderTest, store: Persistence, faults: Any, kind: str) -> None:
        record, again = _record(store.queue), _record(store.queue)
        record.key = again.key = "invoice-42"
        rule = _arm(faults, kind, record)
        # A retry after an applied commit must not take the first record's key for a holder of its own.
        assert store.enqueue_keyed([record]) == [record.id]
        assert rule.fired == 1
        assert store.enqueue_keyed([again]) == [record.id]
        assert store.counts() == {("r", PENDING): 1}
        assert [entry[-1] for entry in _due_entries(backend, store.queue)] == [record.id]

    def test_add_stats(self, store: Persistence, faults: Any, kind: str) -> None:
        from skunkqueue.metrics import RouteMinute

        minute = int(time.time() // 60)
        rule = faults.inject(kind, key_contains="stats", times=1)
        store.add_stats([RouteMinute("r", minute, {"completed": 3})])
        assert rule.fired == 1
        assert [(s.route, s.counts) for s in store.stats(minute)] == [("r", {"completed": 3})]

    def test_claim(self, store: Persistence, faults: Any, kind: str) -> None:
        record = _record(store.queue)
        store.enqueue([record])
        rule = _arm(faults, kind, record)
        claimed = store.claim("r", "w1", 30)
        assert rule.fired == 1
        # The worker that claimed it received it: nothing is left running unowned.
        assert [(r.id, r.token, r.owner) for r in claimed] == [(record.id, 1, "w1")]
        stored = store.get(record.id)
        assert stored is not None and (stored.state, stored.token, stored.owner) == (RUNNING, 1, "w1")
        assert store.counts() == {("r", RUNNING): 1}
        assert store.claim("r", "w2", 30) == []

    def test_finish(self, store: Persistence, faults: Any, kind: str) -> None:
        record = _record(store.queue)
        store.enqueue([record])
        [claimed] = store.claim("r", "w1", 30)
        rule = _arm(faults, kind, record)
        assert store.finish(record.id, claimed.token, policy.completed(b"3")) is True
        assert rule.fired == 1
        done = store.get(record.id)
        assert done is not None and (done.state, done.result) == (COMPLETE, b"3")
        assert store.counts() == {("r", COMPLETE): 1}
        assert store.finish(record.id, claimed.token, policy.completed(b"3")) is False  # a new call: no

    def test_finish_to_retry_then_another_claim_gets_a_new_token(self, store: Persistence, faults: Any,
                                                                 kind: str) -> None:
        record = _record(store.queue)
        store.enqueue([record])
        [first] = store.claim("r", "w1", 30)
        rule = _arm(faults, kind, record)
        outcome = Outcome(state=PENDING, due=time.time() - 1)
        assert store.finish(record.id, first.token, outcome) is True
        assert rule.fired == 1
        assert store.counts() == {("r", PENDING): 1}
        [second] = store.claim("r", "w2", 30)
        assert second.token == first.token + 1 and second.owner == "w2"
        # The token fences the first worker out.
        assert store.finish(record.id, first.token, policy.completed(b"late")) is False
        assert store.renew("w1", [(record.id, first.token)], 30) == {record.id: "lost"}
        assert store.claim("r", "w3", 30) == []

    def test_renew(self, store: Persistence, faults: Any, kind: str) -> None:
        record = _record(store.queue)
        store.enqueue([record])
        [claimed] = store.claim("r", "w1", 5)
        rule = _arm(faults, kind, record)
        assert store.renew("w1", [(record.id, claimed.token)], 60) == {record.id: LEASE_OK}
        assert rule.fired == 1
        renewed = store.get(record.id)
        assert renewed is not None and renewed.lease_until is not None and renewed.lease_until > time.time() + 50
        assert store.expired_leases(time.time() + 30) == []

    def test_request_kill(self, store: Persistence, faults: Any, kind: str) -> None:
        record = _record(store.queue)
        store.enqueue([record])
        store.claim("r", "w1", 30)
        rule = _arm(faults, kind, record)
        assert store.request_kill(record.id) is True
        assert rule.fired == 1
        flagged = store.get(record.id)
        assert flagged is not None and flagged.kill_requested and store.counts() == {("r", RUNNING): 1}

    def test_purge(self, store: Persistence, faults: Any, kind: str) -> None:
        records = [_record(store.queue) for _ in range(3)]
        store.enqueue(records)
        rule = _arm(faults, kind, records[0])
        assert store.purge("r") == 3
        assert rule.fired == 1
        assert store.counts() == {} and store.list_jobs() == []


@pytest.mark.parametrize("where", ["due", "job"])
def test_reads_failing_as_too_old_are_retried(store: Persistence, faults: Any, where: str) -> None:
    records = [_record(store.queue) for _ in range(3)]
    store.enqueue(records)
    rule = faults.inject("read_1007", key_contains=where, times=2)
    claimed = store.claim("r", "w", 30, limit=3)
    assert rule.fired == 2
    assert sorted(r.id for r in claimed) == sorted(r.id for r in records)
    assert store.counts() == {("r", RUNNING): 3}


def test_markers_are_deleted_by_housekeeping_and_only_when_old(backend: BackendUnderTest, store: Persistence,
                                                              monkeypatch: Any) -> None:
    import fdb

    from skunkqueue_fdb import persistence as module

    applied = fdb.Subspace((backend.db, store.queue))["applied"]

    def markers() -> int:
        return len(fdb.transactional(lambda tr: list(tr.get_range(applied.range().start, applied.range().stop)))(
            fdb.open(backend.url)))

    store.enqueue([_record(store.queue) for _ in range(2)])
    store.claim("r", "w", 30)
    assert markers() == 2
    store.delete_expired(time.time() + module.APPLIED_KEEP - 60)  # a housekeeper's clock a minute short
    assert markers() == 2
    store.delete_expired(time.time() + module.APPLIED_KEEP + 1)
    assert markers() == 0


def test_a_worker_under_commit_faults_runs_each_job_once(backend: BackendUnderTest, tmp_path: Path) -> None:
    """A real ``skunq work`` pool whose every commit may fail as a real cluster's can."""
    rules = [{"kind": "apply_then_1021", "rate": 0.25, "times": -1},
             {"kind": "fail_then_1021", "rate": 0.1, "times": -1},
             {"kind": "apply_then_1031", "rate": 0.05, "times": -1},
             {"kind": "fail_then_1031", "rate": 0.05, "times": -1},
             {"kind": "read_1007", "rate": 0.05, "times": -1}]
    stats = tmp_path / "faults"
    settings = {"rules": rules, "stats_file": str(stats)}
    faulty = BackendUnderTest(name="fdb", url=backend.url, db=backend.db, label=backend.label,
                              env={**backend.env, "SKUNKQUEUE_FDB_STANDIN": json.dumps(settings)})
    queue_name = backend.new_queue_name()
    queue = SkunkQueue(queue_name, backend="fdb", conn_url=backend.url, dbname=backend.db)
    mark = queue.event(routes=["r"])(jobs.mark.func)
    side_effects = tmp_path / "executions"
    for n in range(JOBS):
        mark.fire(str(side_effects), f"job-{n}")
    pool = PoolProcess(faulty, queue_name, ["r"], concurrency=2, lease=30, log_path=tmp_path / "pool.log")
    try:
        pool.wait_ready(60)
        # Well inside the 30 s lease: a claim that applied but was not handed over
        # would leave its job running until the lease expired.
        wait_until(lambda: queue.counts().get(("r", COMPLETE), 0) == JOBS, 25, "every job complete")
    finally:
        pool.stop()
    lines = side_effects.read_text().split()
    assert sorted(lines) == sorted(f"job-{n}" for n in range(JOBS)), "each job ran exactly once"
    assert queue.counts() == {("r", COMPLETE): JOBS}
    queue.close()
    # The faults did happen, in the worker processes (each writes its counts at exit).
    injected = [json.loads(line) for line in stats.read_text().splitlines()]
    assert sum(s["injected"] for s in injected) >= JOBS // 2, injected


@pytest.mark.parametrize("kind", ["apply_then_1021", "apply_then_1031"])
def test_a_claim_between_an_applied_enqueue_and_its_retry_keeps_the_record(
        backend: BackendUnderTest, store: Persistence, faults: Any, monkeypatch: Any, kind: str) -> None:
    """The enqueue's commit applies but the client hears 1021 (or 1031); before its retry a worker
    claims the record. The retry must not store it again: pending, it would run a second time."""
    import fdb

    record = _record(store.queue)
    rule = _arm(faults, kind, record)
    commit = fdb.impl.Transaction.commit
    between: list[JobRecord] = []
    claiming: list[bool] = []

    def commit_then_claim(tr: Any) -> Any:
        done = commit(tr)
        if rule.fired == 1 and not claiming:  # the enqueue's applied commit, reported as failed
            claiming.append(True)  # once: the claim commits through here too
            with backend.open(store.queue) as worker:
                between.extend(worker.claim("r", "w-between", 30))
        return done

    monkeypatch.setattr(fdb.impl.Transaction, "commit", commit_then_claim)
    store.enqueue([record])  # retried inside: no error reaches the producer
    monkeypatch.undo()
    assert rule.fired == 1 and [(r.id, r.token) for r in between] == [(record.id, 1)]
    stored = store.get(record.id)
    assert stored is not None and (stored.state, stored.owner, stored.token, stored.attempts) == \
        (RUNNING, "w-between", 1, 1)
    assert _due_entries(backend, store.queue) == [] and store.counts() == {("r", RUNNING): 1}
    assert store.claim("r", "w2", 30) == []
    assert store.finish(record.id, 1, policy.completed(b"first run"))


@pytest.mark.parametrize("api", ["enqueue", "enqueue_keyed"])
def test_a_producer_that_sends_an_applied_enqueue_again_leaves_the_claimed_record(
        backend: BackendUnderTest, faults: Any, api: str) -> None:
    """The enqueue's commit applies, the client hears 1021 and its retries cannot read their marker
    (1007 until the transaction's timeout): the producer gets BackendUnavailable, though the record
    is stored. A worker claims it; the producer sends the same batch again, as it may after an error.
    Stored again, the running record was pending: claimable by a second worker at once."""
    from skunkqueue.errors import BackendUnavailable

    with backend.open(backend.new_queue_name(), timeout_ms=1500) as store:
        record, other = _record(store.queue), _record(store.queue)
        if api == "enqueue_keyed":
            record.key = "order-7"
        send = getattr(store, api)
        rule = _arm(faults, "apply_then_1021", record)
        unreadable = faults.inject("read_1007", key_contains="applied", times=-1)
        with pytest.raises(BackendUnavailable):
            send([record])
        assert rule.fired == 1 and unreadable.fired >= 1
        unreadable.times = 0
        [claimed] = store.claim("r", "w1", 30)
        assert (claimed.id, claimed.token) == (record.id, 1)
        assert send([record, other]) in (None, [record.id, other.id])  # no error: the batch is stored
        stored = store.get(record.id)
        assert stored is not None and (stored.state, stored.owner, stored.token, stored.attempts) == \
            (RUNNING, "w1", 1, 1)
        assert [r.id for r in store.claim("r", "w2", 30, limit=5)] == [other.id]
        assert store.counts() == {("r", RUNNING): 2}
        assert store.finish(record.id, claimed.token, policy.completed(b"first run"))
        done = store.get(record.id)
        assert done is not None and (done.state, done.result) == (COMPLETE, b"first run")


def test_a_job_sent_again_while_a_worker_runs_it_runs_once(backend: BackendUnderTest, faults: Any,
                                                            tmp_path: Path) -> None:
    """End to end: the enqueue applied but failed for the producer (as above), a pool of two workers
    starts the job, and the producer sends it again while it runs. Starts are counted in a file."""
    from skunkqueue.errors import BackendUnavailable

    queue_name = backend.new_queue_name()
    starts = tmp_path / "starts"
    now = time.time() - 1
    record = JobRecord(id=new_id(), queue=queue_name, route="r", func="skunkqueue.testing.jobs:nap",
                       payload=json.dumps([[1.5, str(starts)], {}]).encode(), due=now, created=now)
    with backend.open(queue_name, timeout_ms=1500) as store:
        rule = _arm(faults, "apply_then_1021", record)
        unreadable = faults.inject("read_1007", key_contains="applied", times=-1)
        with pytest.raises(BackendUnavailable):
            store.enqueue([record])
        assert rule.fired == 1
        unreadable.times = 0
        pool = PoolProcess(backend, queue_name, ["r"], concurrency=2, lease=30, log_path=tmp_path / "pool.log")
        try:
            pool.wait_ready(60)
            wait_until(lambda: starts.exists() and "start" in starts.read_text(), 30, "the job to start")
            store.enqueue([record])
            done = store.wait_finished(record.id, 30)
            assert done is not None and (done.state, done.attempts) == (COMPLETE, 1)
            time.sleep(1.0)  # room for a second start, had the resend made it claimable
        finally:
            pool.stop()
    assert starts.read_text().count("start") == 1, starts.read_text()
