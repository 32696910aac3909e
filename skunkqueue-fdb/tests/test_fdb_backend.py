"""What is specific to the fdb backend, beyond the shared conformance kit.

Runs on the stand-in (class ids say StandIn) or, with SKUNKQUEUE_FDB_CLUSTER_FILE,
on a real cluster (ids say RealCluster).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from skunkqueue.errors import BackendUnavailable, MalformedRecord, PayloadTooLarge
from skunkqueue.persistence import Persistence
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import COMPLETE, ERROR, PENDING, RUNNING, JobRecord, new_id
from skunkqueue.testing import BackendUnderTest, jobs

REAL = bool(os.environ.get("SKUNKQUEUE_FDB_CLUSTER_FILE"))


def _record(queue: str, *, due: float | None = None, payload: bytes = b"[[1,2],{}]",
            job_id: str | None = None) -> JobRecord:
    now = time.time()
    return JobRecord(id=job_id or new_id(), queue=queue, route="r", func="skunkqueue.testing.jobs:add",
                     payload=payload, due=now if due is None else due, created=now)


class FDBBackendChecks:
    @pytest.fixture
    def store(self, backend: BackendUnderTest) -> Iterator[Persistence]:
        persistence = backend.open(backend.new_queue_name())
        yield persistence
        persistence.close()

    def test_payload_over_the_limit_is_refused_at_fire(self, backend: BackendUnderTest) -> None:
        queue = SkunkQueue(backend.new_queue_name(), backend="fdb", conn_url=backend.url, dbname=backend.db)
        job = queue.event(routes=["r"])(jobs.add.func)
        limit = queue.persistence.max_payload
        assert limit is not None
        with pytest.raises(PayloadTooLarge, match=f"the fdb backend stores at most {limit}"):
            job.fire("x" * limit, "")
        assert queue.counts() == {}
        queue.close()

    def test_a_fan_out_of_ten_thousand_is_counted_down_in_parts(self, backend: BackendUnderTest) -> None:
        # One transaction counts down SETTLE_BUDGET dependents (10 MB, five seconds of reads); the
        # finish carries on with the rest before it returns.
        from skunkqueue import policy
        from skunkqueue.testing.suite_support import declare
        from skunkqueue.workflow import chain, group
        from skunkqueue_fdb.persistence import SETTLE_BUDGET

        queue = SkunkQueue(backend.new_queue_name(), backend="fdb", conn_url=backend.url, dbname=backend.db)
        add = declare(queue, jobs.add)
        members = 10_000
        assert members > 5 * SETTLE_BUDGET
        handle = chain(add.s(1, 1), group(add.s(i) for i in range(members))).fire()
        [first] = queue.persistence.claim("r", "w", 30)
        assert first.id == handle.jobs[0].id
        assert queue.persistence.finish(first.id, first.token, policy.completed(b"2"))
        assert queue.counts() == {("r", "complete"): 1, ("r", PENDING): members}
        released: set[str] = set()
        while batch := queue.persistence.claim("r", "w", 30, limit=500):
            assert not released & {r.id for r in batch}, "a member was claimed twice"
            released |= {r.id for r in batch}
        assert released == {j.id for j in handle.jobs[1:]}
        queue.close()

    def test_payloads_and_results_larger_than_one_value_round_trip(self, store: Persistence) -> None:
        # FoundationDB refuses values over 100 kB; the backend splits them.
        big = bytes(range(256)) * 1500  # 384 kB, every byte value
        record = _record(store.queue, payload=big)
        store.enqueue([record])
        [claimed] = store.claim("r", "w", 30)
        assert claimed.payload == big
        assert store.finish(record.id, claimed.token, _completed(big[::-1]))
        done = store.get(record.id)
        assert done is not None and (done.state, done.payload, done.result) == (COMPLETE, big, big[::-1])

    def test_a_batch_too_big_for_one_transaction_is_refused_whole(self, store: Persistence) -> None:
        batch = [_record(store.queue, payload=b"x" * 900_000) for _ in range(11)]
        with pytest.raises(PayloadTooLarge, match="smaller batches"):
            store.enqueue(batch)
        assert store.counts() == {} and store.get(batch[0].id) is None

    def test_equal_due_times_are_claimed_in_commit_order(self, store: Persistence) -> None:
        # The due index ends in a versionstamp: what was enqueued first is
        # claimed first, even when ids (here chosen by hand) sort otherwise.
        due = time.time() - 1
        ids = ["c-first", "b-second", "a-third"]
        for job_id in ids:
            store.enqueue([_record(store.queue, due=due, job_id=job_id)])
        in_one_batch = [_record(store.queue, due=due, job_id=f"z{n}") for n in (3, 1, 2)]
        store.enqueue(in_one_batch)
        claimed = [store.claim("r", "w", 30)[0].id for _ in range(6)]
        assert claimed == ids + ["z3", "z1", "z2"]

    def test_claimers_in_separate_processes_never_share_a_record(self, backend: BackendUnderTest,
                                                                 store: Persistence) -> None:
        records = [_record(store.queue) for _ in range(120)]
        store.enqueue(records)
        script = (
            "import json, sys, time\n"
            "from skunkqueue.testing import BackendUnderTest\n"
            "b = BackendUnderTest(**json.loads(sys.argv[1]))\n"
            "taken = []\n"
            "with b.open(sys.argv[2]) as p:\n"
            "    p.counts()\n"
            "    print('ready', flush=True)\n"
            "    sys.stdin.readline()  # start together, so that they compete\n"
            "    while (got := p.claim('r', sys.argv[3], 30, limit=2)):\n"
            "        taken += [r.id for r in got]\n"
            "        time.sleep(0.002)  # let the others in, on a two-core machine too\n"
            "print(json.dumps(taken))\n"
        )
        spec = json.dumps({"name": backend.name, "url": backend.url, "db": backend.db})
        claimers = [subprocess.Popen([sys.executable, "-c", script, spec, store.queue, f"w{n}"], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=backend.process_env())
                    for n in range(3)]
        for p in claimers:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        for p in claimers:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.close()
        taken = []
        for p in claimers:
            assert p.stdout is not None
            taken.append(json.loads(p.stdout.read()))
            assert p.wait(120) == 0
        everything = [job_id for ids in taken for job_id in ids]
        assert sorted(everything) == sorted(r.id for r in records)  # each exactly once
        assert sum(1 for ids in taken if ids) >= 2, "the claimers should have competed"
        assert store.counts() == {("r", RUNNING): 120}

    def test_undecodable_record_is_quarantined_not_returned(self, backend: BackendUnderTest,
                                                            store: Persistence) -> None:
        import fdb

        bad, good = _record(store.queue, due=time.time() - 2), _record(store.queue)
        store.enqueue([bad, good])
        space = fdb.Subspace((backend.db, store.queue))
        fdb.transactional(lambda tr: tr.set(space["job"].pack((bad.id, "meta")), b"\x00garbage"))(
            fdb.open(backend.url))
        assert [r.id for r in store.claim("r", "w", 30, limit=5)] == [good.id]
        with pytest.raises(MalformedRecord):
            store.get(bad.id)
        assert store.counts() == {("r", RUNNING): 1, ("r", ERROR): 1}
        assert store.claim("r", "w", 30) == []

    def test_finished_records_expire_after_result_ttl(self, backend: BackendUnderTest) -> None:
        with backend.open(backend.new_queue_name(), result_ttl=0.3) as store:
            record = _record(store.queue)
            store.enqueue([record])
            [claimed] = store.claim("r", "w", 30)
            assert store.finish(record.id, claimed.token, _completed(b"1"))
            store.delete_expired(time.time())
            assert store.get(record.id) is not None
            time.sleep(0.4)
            store.delete_expired(time.time())
            assert store.get(record.id) is None and store.counts() == {}

    def test_idle_worker_wakes_when_scheduled_work_becomes_due(self, store: Persistence) -> None:
        store.enqueue([_record(store.queue, due=time.time() + 0.5)])
        started = time.monotonic()
        store.wait_for_work("r", "w", 5.0)
        assert 0.3 < time.monotonic() - started < 2.0
        assert len(store.claim("r", "w", 30)) == 1

    def test_pending_count_is_kept_by_atomic_counters(self, store: Persistence) -> None:
        records = [_record(store.queue) for _ in range(5)]
        store.enqueue(records)
        store.claim("r", "w", 30, limit=2)
        assert store.purge("r") == 3
        assert store.counts() == {("r", RUNNING): 2}
        assert store.list_jobs(state=PENDING) == []


def _completed(result: bytes) -> Any:
    from skunkqueue import policy

    return policy.completed(result)


@pytest.mark.skipif(REAL, reason="SKUNKQUEUE_FDB_CLUSTER_FILE is set: this run uses the real cluster")
class TestFDBStandInBackend(FDBBackendChecks):
    @pytest.fixture
    def backend(self, standin_cluster: Any, fdb_root: str) -> BackendUnderTest:
        from fdb_servers import STANDIN_LABEL, standin_env

        return BackendUnderTest(name="fdb", url=standin_cluster.cluster_file, db=fdb_root, env=standin_env(),
                                label=STANDIN_LABEL)

    def test_unreachable_cluster_is_backend_unavailable(self, tmp_path: Path, fdb_root: str) -> None:
        cluster_file = tmp_path / "nowhere.cluster"
        cluster_file.write_text("nowhere:x@127.0.0.1:9\n")
        backend = BackendUnderTest(name="fdb", url=str(cluster_file), db=fdb_root, options={"timeout_ms": 500})
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match=f"cluster file {cluster_file}.*timed out"):
            backend.open("q").counts()
        assert time.monotonic() - started < 5


    def test_a_fan_out_is_released_within_five_seconds_a_part(self, backend: BackendUnderTest,
                                                              faults: Any) -> None:
        # Its finish reads each dependent's wait count, settled mark, fields and slot: waited for
        # one at a time at 1 ms per request, 2,500 of them took 10 s (timed out).
        from skunkqueue import policy
        from skunkqueue.dependencies import waiting as waiting_for_parents
        from skunkqueue.testing.suite_support import declare
        from skunkqueue.workflow import chain, group

        queue = SkunkQueue(backend.new_queue_name(), backend="fdb", conn_url=backend.url, dbname=backend.db)
        add = declare(queue, jobs.add)
        handle = chain(add.s(1, 1), group(add.s(i) for i in range(2500))).fire()
        [first] = queue.persistence.claim("r", "w", 30)
        assert first.id == handle.jobs[0].id
        faults.configure(request_latency_ms=1)
        assert queue.persistence.finish(first.id, first.token, policy.completed(b"2"))
        faults.reset()
        waiting = [r for r in queue.persistence.get_many([j.id for j in handle.jobs[1:]])
                   if r is None or waiting_for_parents(r)]
        assert waiting == [] and queue.counts() == {("r", "complete"): 1, ("r", PENDING): 2500}
        queue.close()

    def test_a_count_down_stopped_part_way_is_carried_on_by_housekeeping(
            self, backend: BackendUnderTest, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
        # The finish committed its first part; then the cluster went away (or the worker died):
        # the finish still stands, and housekeeping carries the rest on once the entry is stale.
        import fdb

        from skunkqueue import policy
        from skunkqueue.dependencies import waiting as waiting_for_parents
        from skunkqueue.testing.suite_support import declare
        from skunkqueue.workflow import chain, group
        from skunkqueue_fdb.persistence import SETTLE_BUDGET, SETTLE_STALE

        queue = SkunkQueue(backend.new_queue_name(), backend="fdb", conn_url=backend.url, dbname=backend.db)
        store = queue.persistence
        add = declare(queue, jobs.add)
        members = 2 * SETTLE_BUDGET + 500
        handle = chain(add.s(1, 1), group(add.s(i) for i in range(members))).fire()
        [first] = store.claim("r", "w", 30)

        def cut(*_args: Any, **_kwargs: Any) -> None:
            raise fdb.FDBError(1031)

        monkeypatch.setattr(store, "_settle_left", cut)
        with caplog.at_level("WARNING", logger="skunkqueue.fdb"):
            assert store.finish(first.id, first.token, policy.completed(b"2"))
        assert "housekeeping carries it on" in caplog.text
        monkeypatch.undo()

        def still_waiting() -> int:
            return sum(1 for r in store.get_many([j.id for j in handle.jobs[1:]]) if waiting_for_parents(r))

        assert still_waiting() == members - SETTLE_BUDGET
        store.delete_expired(time.time())  # fresh: a live finisher may be at it still
        assert still_waiting() == members - SETTLE_BUDGET
        store.delete_expired(time.time() + SETTLE_STALE + 1)
        assert still_waiting() == 0
        released: list[str] = []
        while batch := store.claim("r", "w", 30, limit=500):
            released += [r.id for r in batch]
        assert sorted(released) == sorted(j.id for j in handle.jobs[1:])
        queue.close()

    def test_a_callback_of_thousands_of_parents_is_stored_within_five_seconds(
            self, backend: BackendUnderTest, faults: Any) -> None:
        # A workflow larger than one transaction goes in several; the callback's own transaction
        # reads every parent's state. On a cluster answering in a millisecond, 6,000 reads waited
        # for one at a time outlast the five seconds a transaction may read for: transaction_too_old,
        # retried until the timeout (CI saw it with 10,000 parents on a loaded machine).
        from skunkqueue.dependencies import waiting
        from skunkqueue.testing.suite_support import declare
        from skunkqueue.workflow import group

        queue = SkunkQueue(backend.new_queue_name(), backend="fdb", conn_url=backend.url, dbname=backend.db)
        add, total = declare(queue, jobs.add), declare(queue, jobs.total)
        parents = 6000  # with 1 kB each, more than one transaction holds
        faults.configure(request_latency_ms=1)
        handle = group(add.s("x" * 1000, str(i)) for i in range(parents)).then(total.s()).fire()
        faults.reset()
        callback = queue.get(handle.jobs[-1].id)
        assert callback is not None and waiting(callback)
        assert queue.counts() == {("r", PENDING): parents + 1}
        queue.close()


class TestFDBRealClusterBackend(FDBBackendChecks):
    @pytest.fixture
    def backend(self, real_cluster_file: str, fdb_root: str) -> BackendUnderTest:
        return BackendUnderTest(name="fdb", url=real_cluster_file, db=fdb_root, label="fdb (real cluster)")


def test_missing_client_library_is_a_clear_error(tmp_path: Path) -> None:
    # The real bindings, in a process without the stand-in: here libfdb_c is absent.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = (
        "from skunkqueue.backends import open_backend\n"
        "from skunkqueue.errors import BackendUnavailable\n"
        "try:\n"
        "    open_backend('q', 'fdb')\n"
        "except BackendUnavailable as exc:\n"
        "    print('UNAVAILABLE', exc)\n"
        "else:\n"
        "    print('OPENED')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60,
                         cwd=tmp_path).stdout
    if out.startswith("OPENED"):
        pytest.skip("a FoundationDB client library is installed here")
    assert out.startswith("UNAVAILABLE FoundationDB client library not found: install the FoundationDB client")
    assert "Traceback" not in out


# -- using=: the application's own transaction ---------------------------------------------


def test_a_transaction_on_another_cluster_is_refused_in_one_line(standin_cluster: Any, fdb_root: str,
                                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    import fdb
    import fdb_servers as servers

    from skunkqueue import SkunkQueue
    from skunkqueue.errors import ConfigurationError
    from skunkqueue.testing import jobs

    other = servers.StandInCluster(tmp_path_factory.mktemp("fdb-other")).start()
    if not fdb.is_api_version_selected():
        fdb.api_version(710)
    queue = SkunkQueue("using-other", backend="fdb", conn_url=standin_cluster.cluster_file, dbname=fdb_root)
    add = queue.event(routes=["r"])(jobs.add.func)
    try:
        theirs = fdb.open(other.cluster_file).create_transaction()
        with pytest.raises(ConfigurationError) as caught:
            add.fire(1, 2, using=theirs)
        assert "another FoundationDB cluster" in str(caught.value) and "\n" not in str(caught.value)
        ours = fdb.open(standin_cluster.cluster_file).create_transaction()
        kept = add.fire(3, 4, using=ours)  # the queue's own cluster: stored, once committed
        assert queue.get(kept.id) is None
        ours.commit().wait()
        assert queue.get(kept.id) is not None
    finally:
        queue.close()
        other.stop()
