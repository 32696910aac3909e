"""fire(..., using=session) on MongoDB beyond the kit: standalone servers, other deployments, keys, workflows."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from pymongo import MongoClient
from pymongo.client_session import ClientSession

from skunkqueue import SkunkQueue, policy, serializer
from skunkqueue.errors import ConfigurationError, RecordHeld
from skunkqueue.record import COMPLETE
from skunkqueue.testing import jobs
from skunkqueue.testing.kit import BackendUnderTest
from skunkqueue.testing.suite_support import declare, wait_until
from skunkqueue.testing.workers import PoolProcess
from skunkqueue.workflow import chain, group

DB = "skunkqueue_using"


def _queue(server: Any) -> SkunkQueue:
    return SkunkQueue(f"using-{uuid.uuid4().hex[:8]}", backend="mongodb", conn_url=server.url, dbname=DB)


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    return text


def test_a_transaction_on_a_standalone_server_is_refused_in_one_line(mongo_standalone: Any) -> None:
    queue = _queue(mongo_standalone)
    add = queue.event(routes=["r"])(jobs.add.func)
    try:
        with MongoClient(mongo_standalone.url) as client, client.start_session() as session:
            session.start_transaction()
            with pytest.raises(ConfigurationError) as caught:
                add.fire(1, 2, using=session)
            assert "standalone" in _one_line(caught.value) and "replica set" in str(caught.value)
            parent = add.fire(0, 0)
            for fire in (lambda: chain(add.s(1, 2), add.s(3)).fire(using=session),
                         lambda: add.fire(5, 6, after=[parent], using=session)):
                with pytest.raises(ConfigurationError) as caught:
                    fire()
                assert "standalone" in _one_line(caught.value)
            session.abort_transaction()
            # Without a transaction, a session of the queue's deployment simply stores the job.
            stored = add.fire(3, 4, using=session)
        assert queue.get(stored.id) is not None
        assert queue.persistence.counts() == {("r", "pending"): 2}  # the parent and that job: nothing else
    finally:
        queue.close()


def test_a_session_of_another_deployment_is_refused_and_stores_nothing(mongo_replset: Any,
                                                                     mongo_standalone: Any) -> None:
    queue = _queue(mongo_replset)
    add = queue.event(routes=["r"])(jobs.add.func)
    try:
        with MongoClient(mongo_standalone.url) as client, client.start_session() as session:
            with pytest.raises(ConfigurationError) as caught:
                add.fire(1, 2, using=session)
            assert "another MongoDB deployment" in _one_line(caught.value)
            assert client[DB]["jobs"].count_documents({"queue": queue.name}) == 0
        assert queue.persistence.counts() == {}
    finally:
        queue.close()


def test_a_key_held_outside_the_transaction_returns_its_holder_and_rollback_keeps_it(mongo_replset: Any) -> None:
    queue = _queue(mongo_replset)
    add = queue.event(routes=["r"])(jobs.add.func)
    try:
        first = add.fire(1, 2, key="order-7")
        with MongoClient(mongo_replset.url) as client, client.start_session() as session:
            session.start_transaction()
            again = add.fire(3, 4, key="order-7", using=session)
            fresh = add.fire(5, 6, key="order-8", using=session)
            assert again.id == first.id
            session.abort_transaction()
            assert queue.get(first.id) is not None and queue.get(fresh.id) is None
            session.start_transaction()
            client["app"]["rows"].insert_one({"order": 8}, session=session)
            kept = add.fire(5, 6, key="order-8", using=session)
            assert queue.get(kept.id) is None  # nobody sees it before the commit
            session.commit_transaction()
        assert queue.get(kept.id) is not None and sum(queue.persistence.counts().values()) == 2
    finally:
        queue.close()


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _finish(queue: SkunkQueue, job_id: str) -> None:
    """Run ``job_id`` to completion as a worker would (it must be the route's only due record)."""
    [claimed] = queue.persistence.claim("r", "test-worker", 30)
    assert claimed.id == job_id
    assert queue.persistence.finish(job_id, claimed.token, policy.completed(serializer.dumps(0, claimed.serializer)))


def _traces(client: MongoClient[dict[str, Any]], queue: SkunkQueue, ids: list[str]) -> dict[str, int]:
    """What a workflow of ``ids`` left in each collection (read outside any transaction)."""
    db = client[DB]
    return {"jobs": db["jobs"].count_documents({"_id": {"$in": ids}}),
            "waits": db["waits"].count_documents({"_id": {"$in": ids}}),
            "deps": db["deps"].count_documents({"child": {"$in": ids}}),
            "settled": db["settled"].count_documents({"child": {"$in": ids}})}


@pytest.fixture
def replset_queue(mongo_replset: Any) -> Iterator[SkunkQueue]:
    queue = _queue(mongo_replset)
    yield queue
    queue.close()


@pytest.fixture
def pool(mongo_replset: Any, replset_queue: SkunkQueue, tmp_path: Path) -> Iterator[PoolProcess]:
    """A worker pool on the test's queue, started when the test first asks for it."""
    started = PoolProcess(BackendUnderTest(name="mongodb", url=mongo_replset.url, db=DB), replset_queue.name,
                          ["r"], log_path=tmp_path / "pool.log")
    started.wait_ready()
    yield started
    started.stop()


def test_an_abort_after_the_workflow_was_stored_leaves_no_trace(mongo_replset: Any,
                                                                replset_queue: SkunkQueue) -> None:
    queue = replset_queue
    add, total = declare(queue, jobs.add), declare(queue, jobs.total)
    done = add.fire(1, 1)
    _finish(queue, done.id)
    waiting = add.fire(2, 2)  # outside the transaction: pending, never run here
    with MongoClient(mongo_replset.url) as client, client.start_session() as session:
        before = client[DB]["jobs"].find_one({"_id": waiting.id})
        session.start_transaction()
        client["app"]["rows"].insert_one({"scope": queue.name}, session=session)
        steps = chain(add.s(1, 2), add.s(10)).fire(using=session)
        fan = group(add.s(1, 2), add.s(3, 4)).then(total.s(100)).fire(using=session)
        after_both = add.fire(5, 6, after=[done, waiting], using=session)
        ids = [*steps.ids, *fan.ids, after_both.id]
        inside = session.client[DB]
        # Stored, in the transaction: the test would pass vacuously otherwise.
        assert inside["jobs"].count_documents({"_id": {"$in": ids}}, session=session) == len(ids)
        assert inside["deps"].count_documents({"child": after_both.id}, session=session) == 2
        assert inside["settled"].count_documents({"child": after_both.id}, session=session) == 1  # done's count
        assert inside["jobs"].find_one({"_id": waiting.id}, session=session)["has_dependents"] is True
        assert _traces(client, queue, ids) == {"jobs": 0, "waits": 0, "deps": 0, "settled": 0}  # nobody else sees it
        session.abort_transaction()
        assert _traces(client, queue, ids) == {"jobs": 0, "waits": 0, "deps": 0, "settled": 0}
        assert client[DB]["deps"].count_documents({"parent": {"$in": [done.id, waiting.id]}}) == 0
        assert client[DB]["jobs"].find_one({"_id": waiting.id}) == before  # no mark, no field, nothing
        assert client["app"]["rows"].count_documents({"scope": queue.name}) == 0
    assert queue.persistence.dependents(waiting.id) == []
    assert sum(queue.persistence.counts().values()) == 2


def test_a_committed_chain_runs_in_order_exactly_once(mongo_replset: Any, replset_queue: SkunkQueue,
                                                      tmp_path: Path, request: pytest.FixtureRequest) -> None:
    queue = replset_queue
    step, mark = declare(queue, jobs.step), declare(queue, jobs.mark)
    runs = tmp_path / "runs"
    done = mark.fire(str(runs), "before")  # finished before the transaction: counted inside it
    _finish(queue, done.id)
    with MongoClient(mongo_replset.url) as client, client.start_session() as session:
        def work(session: ClientSession) -> tuple[Any, Any]:
            client["app"]["rows"].insert_one({"scope": queue.name}, session=session)
            steps = chain(step.s(None, str(runs), "a"), step.s(str(runs), "b"), step.s(str(runs), "c")).fire(
                using=session)
            last = mark.fire(str(runs), "d", after=[steps.jobs[-1], done], using=session)
            return steps, last

        steps, last = session.with_transaction(work)
    assert queue.get(steps.ids[0]) is not None and queue.get(last.id) is not None
    request.getfixturevalue("pool")
    assert steps.wait(timeout=60) == "c"
    wait_until(lambda: queue.get(last.id) is not None and queue.get(last.id).state == COMPLETE,  # type: ignore[union-attr]
               timeout=60, what="the dependent of the chain and of a parent finished before it to run")
    time.sleep(0.5)  # a second execution would show by now
    assert _lines(runs) == ["a", "b", "c", "d"]


def test_a_retried_transaction_stores_the_workflow_once(mongo_replset: Any, replset_queue: SkunkQueue,
                                                        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    queue = replset_queue
    mark = declare(queue, jobs.mark)
    runs = tmp_path / "runs"
    parent = mark.fire(str(runs), "parent")
    # The parent has a dependent already, so marking it again changes nothing visible: the
    # transaction must still collide with the finish below rather than read a stale "pending".
    earlier = mark.fire(str(runs), "earlier", after=[parent])
    attempts: list[str] = []
    with MongoClient(mongo_replset.url) as client, client.start_session() as session:
        def work(session: ClientSession) -> Any:
            attempts.append("try")
            client["app"]["rows"].insert_one({"scope": queue.name}, session=session)  # the snapshot starts here
            if len(attempts) == 1:
                _finish(queue, parent.id)  # a worker finishes the parent meanwhile, outside the transaction
            return mark.fire(str(runs), "child", after=[parent], using=session)

        child = session.with_transaction(work)
    assert len(attempts) == 2, "the write conflict on the parent did not make with_transaction retry"
    assert client_count(mongo_replset, queue) == {"rows": 1, "jobs": 3}
    request.getfixturevalue("pool")
    wait_until(lambda: sorted(_lines(runs)) == ["child", "earlier"], timeout=60,
               what="both dependents of the finished parent to run")
    time.sleep(0.5)
    assert sorted(_lines(runs)) == ["child", "earlier"]
    assert queue.persistence.dependents(parent.id) == sorted([earlier.id, child.id])


def client_count(server: Any, queue: SkunkQueue) -> dict[str, int]:
    with MongoClient(server.url) as client:
        return {"rows": client["app"]["rows"].count_documents({"scope": queue.name}),
                "jobs": client[DB]["jobs"].count_documents({"queue": queue.name})}


@pytest.mark.parametrize("end", ["commit", "abort"])
def test_a_parent_finishing_during_the_transaction_waits_for_it_then_counts_the_dependent(
        mongo_replset: Any, replset_queue: SkunkQueue, end: str) -> None:
    queue = replset_queue
    add = declare(queue, jobs.add)
    parent = add.fire(1, 1)
    [claimed] = queue.persistence.claim("r", "test-worker", 30)
    finished: list[float] = []
    held: list[float] = []

    def finish() -> None:
        outcome = policy.completed(serializer.dumps(2, claimed.serializer))
        give_up = time.monotonic() + 30
        while True:
            # A finish waits at most LOCK_WAIT_MS for a record an open transaction holds, then says
            # RecordHeld (a BackendUnavailable); a worker tries its finish again, as here.
            try:
                recorded = queue.persistence.finish(parent.id, claimed.token, outcome)
                break
            except RecordHeld:
                held.append(time.monotonic())
                if held[-1] > give_up:
                    raise
        assert recorded
        finished.append(time.monotonic())

    worker = threading.Thread(target=finish)
    with MongoClient(mongo_replset.url) as client, client.start_session() as session:
        session.start_transaction()
        child = add.fire(5, 6, after=[parent], using=session)
        worker.start()
        time.sleep(1.0)
        # The finish would otherwise have settled with no dependent in sight, and the child, committed
        # afterwards, would wait for a parent that had already counted itself out.
        assert not finished, "the parent's finish did not wait for the transaction that marked it"
        ended = time.monotonic()
        if end == "commit":
            session.commit_transaction()
        else:
            session.abort_transaction()
    worker.join(timeout=30)
    assert finished and finished[0] >= ended
    assert queue.get(parent.id).state == COMPLETE  # type: ignore[union-attr]
    if end == "commit":
        assert [r.id for r in queue.persistence.claim("r", "test-worker", 30)] == [child.id]
    else:
        assert queue.get(child.id) is None and queue.persistence.dependents(parent.id) == []
        assert queue.persistence.claim("r", "test-worker", 30) == []
