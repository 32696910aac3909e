"""Workflows on a standalone mongod, which has no transactions: a count-down cut short is completed.

A worker that dies after its finish's update and before its dependents are
counted leaves the finished record marked ``settle_pending``; housekeeping
(``release_stranded``) counts them, once, whether the worker died before
counting, or after counting and before releasing.
"""

from __future__ import annotations

import uuid
from typing import Any, Iterator

import pytest

import skunkqueue_mongo.persistence as mongo
from skunkqueue import dependencies, policy
from skunkqueue.backends import open_backend
from skunkqueue.persistence import Persistence
from skunkqueue.record import KILLED
from skunkqueue.testing.suite_support import make_record


@pytest.fixture
def store(mongo_standalone: Any) -> Iterator[Persistence]:
    opened = open_backend(f"wf-{uuid.uuid4().hex[:8]}", "mongodb", url=mongo_standalone.url, db="skunkqueue_wf")
    yield opened
    opened.close()


def _waiting(store: Persistence, *parents: str) -> Any:
    return make_record(store.queue, parents=list(parents), due=dependencies.WAITING_DUE)


def _claim_ids(store: Persistence) -> list[str]:
    return [r.id for r in store.claim("r", "w", 30, limit=10)]


def _finish_and_die(store: Persistence, job_id: str, monkeypatch: pytest.MonkeyPatch, state: str = "ok") -> None:
    """Finish as a worker that is SIGKILLed right after the finish's own update."""
    [claimed] = store.claim("r", "w", 30)  # the oldest due record: the test's first
    assert claimed.id == job_id
    with monkeypatch.context() as patched:
        patched.setattr(store, "_settle_finished", lambda job_id, **_: None)
        outcome = policy.completed(b"1") if state == "ok" else policy.failed(
            claimed, {"type": "ValueError", "message": "x", "traceback": ""})
        assert store.finish(job_id, claimed.token, outcome)


def test_a_count_down_cut_short_after_the_finish_is_completed_by_housekeeping(
        store: Persistence, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = make_record(store.queue), make_record(store.queue)
    c = _waiting(store, a.id, b.id)
    store.enqueue([a, b, c])
    _finish_and_die(store, a.id, monkeypatch)
    assert store.release_stranded() == 0, "counted while the finisher may still be at it"
    monkeypatch.setattr(mongo, "SETTLE_GRACE", -60.0)
    assert store.release_stranded() == 1
    assert store.release_stranded() == 0, "the mark was not cleared"
    assert _claim_ids(store) == [b.id]
    [running] = [r for r in [store.get(b.id)] if r is not None]
    assert store.finish(b.id, running.token, policy.completed(b"2"))
    assert _claim_ids(store) == [c.id]
    assert _claim_ids(store) == []


@pytest.mark.parametrize("cut", ["after the set", "after the mark", "after the decrement"])
def test_a_count_cut_short_is_completed_and_not_counted_twice(store: Persistence, cut: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = make_record(store.queue), make_record(store.queue)
    c = _waiting(store, a.id, b.id)
    store.enqueue([a, b, c])
    jobs, settled, waits = (store.jobs, store.settled, store.waits)  # type: ignore[attr-defined]
    # a's worker died part-way through counting a into c (each step as _settle does it).
    [claimed] = store.claim("r", "w", 30)
    assert claimed.id == a.id
    with monkeypatch.context() as patched:
        patched.setattr(store, "_settle_finished", lambda job_id, **_: None)
        assert store.finish(a.id, claimed.token, policy.completed(b"1"))
    settled.insert_one({"_id": f"{c.id}/{a.id}", "queue": store.queue, "child": c.id, "parent": a.id,
                        "state": "complete", "counted": False})
    if cut != "after the set":
        settled.update_one({"_id": f"{c.id}/{a.id}"}, {"$set": {"counted": True}})
    if cut == "after the decrement":
        waits.update_one({"_id": c.id}, {"$inc": {"left": -1}})
    assert jobs.find_one({"_id": a.id})["settle_pending"] is True
    # b finishes normally before or after housekeeping comes by: c is released once, after both.
    monkeypatch.setattr(mongo, "SETTLE_GRACE", -60.0)
    assert store.release_stranded() == 1
    assert _claim_ids(store) == [b.id]
    assert _claim_ids(store) == [], "released before its second parent finished"
    got = store.get(b.id)
    assert got is not None and store.finish(b.id, got.token, policy.completed(b"2"))
    assert _claim_ids(store) == [c.id]
    assert _claim_ids(store) == []
    assert settled.count_documents({"child": c.id}) == 2 and waits.find_one({"_id": c.id}) is None


def test_the_last_parent_after_housekeeping_still_releases(store: Persistence,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = make_record(store.queue), make_record(store.queue)
    c = _waiting(store, a.id, b.id)
    store.enqueue([a, b, c])
    settled = store.settled  # type: ignore[attr-defined]
    [claimed] = store.claim("r", "w", 30)
    with monkeypatch.context() as patched:  # died after the mark, before the decrement
        patched.setattr(store, "_settle_finished", lambda job_id, **_: None)
        assert store.finish(a.id, claimed.token, policy.completed(b"1"))
    settled.insert_one({"_id": f"{c.id}/{a.id}", "queue": store.queue, "child": c.id, "parent": a.id,
                        "state": "complete", "counted": True})
    monkeypatch.setattr(mongo, "SETTLE_GRACE", -60.0)
    assert store.release_stranded() == 1  # from now on each parent of c looks at its set
    [running] = store.claim("r", "w", 30)
    assert running.id == b.id and store.finish(b.id, running.token, policy.completed(b"2"))
    assert _claim_ids(store) == [c.id]


def test_a_failure_cut_short_still_ends_the_dependents(store: Persistence, monkeypatch: pytest.MonkeyPatch) -> None:
    a = make_record(store.queue)
    b = _waiting(store, a.id)
    c = _waiting(store, b.id)
    store.enqueue([a, b, c])
    _finish_and_die(store, a.id, monkeypatch, state="fail")
    monkeypatch.setattr(mongo, "SETTLE_GRACE", -60.0)
    assert store.release_stranded() == 1
    got_b, got_c = store.get(b.id), store.get(c.id)
    assert got_b is not None and got_c is not None and (got_b.state, got_c.state) == (KILLED, KILLED)
    assert got_c.error is not None and got_c.error["message"] == f"{b.id} ended killed"
    assert store.release_stranded() == 0


@pytest.mark.parametrize("parents", [2, 3])
def test_a_parent_finishing_while_housekeeping_repairs_still_releases(
        store: Persistence, mongo_standalone: Any, monkeypatch: pytest.MonkeyPatch, parents: int) -> None:
    # The worst moment for the repair: the first parent's worker died after its mark and before
    # its decrement (the hint is one too high); housekeeping has counted the set; then another
    # parent's worker counts and decrements in full, before housekeeping writes the hint. A hint
    # written from that stale count undid the live decrement, and nobody looked at the set again:
    # the dependent waited forever with every parent finished.
    first, *others = [make_record(store.queue) for _ in range(parents)]
    child = _waiting(store, first.id, *(o.id for o in others))
    store.enqueue([first, *others, child])
    settled = store.settled  # type: ignore[attr-defined]
    [claimed] = store.claim("r", "w", 30)
    with monkeypatch.context() as patched:  # died after the mark, before the decrement
        patched.setattr(store, "_settle_finished", lambda job_id, **_: None)
        assert store.finish(first.id, claimed.token, policy.completed(b"1"))
    settled.insert_one({"_id": f"{child.id}/{first.id}", "queue": store.queue, "child": child.id,
                        "parent": first.id, "state": "complete", "counted": True})
    # The other parents' worker: a second client, as another process would be.
    live = open_backend(store.queue, "mongodb", url=mongo_standalone.url, db="skunkqueue_wf")
    try:
        running = live.claim("r", "w2", 30, limit=parents)
        assert [r.id for r in running] == [o.id for o in others]
        between = running[:1]  # finishes while housekeeping is between its count and its hint
        later = running[1:]    # finishes after housekeeping is done
        count = store._release_complete  # type: ignore[attr-defined]

        def count_then_a_parent_finishes(need: dict[str, int], **options: Any) -> dict[str, int]:
            have = count(need, **options)
            while between:
                record = between.pop()
                assert live.finish(record.id, record.token, policy.completed(b"2"))
            return have

        monkeypatch.setattr(store, "_release_complete", count_then_a_parent_finishes)
        monkeypatch.setattr(mongo, "SETTLE_GRACE", -60.0)
        assert store.release_stranded() == 1
        assert not between, "the interleaving did not happen"
        for record in later:
            assert live.finish(record.id, record.token, policy.completed(b"3"))
    finally:
        live.close()
    assert store.release_stranded() == 0
    assert _claim_ids(store) == [child.id], "every parent finished, yet the dependent still waits"
    assert _claim_ids(store) == []


def test_a_late_count_down_leaves_a_released_and_claimed_dependent_alone(
        store: Persistence, monkeypatch: pytest.MonkeyPatch) -> None:
    # Housekeeping (or a slow worker) counting a parent again after its dependent was released and
    # claimed must neither put the dependent back nor let it be claimed a second time.
    a = make_record(store.queue)
    b = _waiting(store, a.id)
    store.enqueue([a, b])
    [running_a] = store.claim("r", "w", 30)
    assert store.finish(a.id, running_a.token, policy.completed(b"1"))
    [running_b] = store.claim("r", "w", 30)
    assert running_b.id == b.id and running_b.attempts == 1
    jobs = store.jobs  # type: ignore[attr-defined]
    jobs.update_one({"_id": a.id}, {"$set": {"settle_pending": True}})  # as if a's worker died counting
    monkeypatch.setattr(mongo, "SETTLE_GRACE", -60.0)
    assert store.release_stranded() == 1
    store._settle_finished(a.id, repair=True)  # type: ignore[attr-defined]
    store._attach(b)  # type: ignore[attr-defined]  # a producer's attach replayed, the worst case
    again = store.get(b.id)
    assert again is not None and (again.state, again.token, again.attempts) == ("running", running_b.token, 1)
    assert _claim_ids(store) == []


class _Counting:
    """A collection whose calls are noted (name of the collection, method) before they run."""

    def __init__(self, name: str, inner: Any, calls: list[tuple[str, str]]) -> None:
        self._name, self._inner, self._calls = name, inner, calls

    def __getattr__(self, attr: str) -> Any:
        found = getattr(self._inner, attr)
        if not callable(found):
            return found

        def call(*args: Any, **kwargs: Any) -> Any:
            self._calls.append((self._name, attr))
            return found(*args, **kwargs)
        return call


def test_a_finish_counts_dependents_down_only_when_there_are_some(
        store: Persistence, monkeypatch: pytest.MonkeyPatch) -> None:
    # Most records have no dependents: their finish is one round trip (the fenced update), as
    # before workflows. A parent's finish counts its dependent down without reading itself again.
    plain, parent = make_record(store.queue), make_record(store.queue)
    child = _waiting(store, parent.id)
    store.enqueue([plain, parent, child])
    calls: list[tuple[str, str]] = []
    for name in ("jobs", "deps", "settled", "waits"):
        monkeypatch.setattr(store, name, _Counting(name, getattr(store, name), calls))
    for record in (plain, parent):
        [running] = store.claim("r", "w", 30)
        assert running.id == record.id
        calls.clear()
        assert store.finish(record.id, running.token, policy.completed(b"1"))
        if record is plain:
            assert calls == [("jobs", "find_one_and_update")]
        else:
            assert calls[0] == ("jobs", "find_one_and_update") and ("jobs", "find_one") not in calls
            assert ("deps", "find") in calls and calls[-1] == ("jobs", "update_one")  # the mark cleared
    calls.clear()
    assert store.finish(plain.id, 1, policy.completed(b"1")) is False  # fenced off: changes nothing
    assert calls == [("jobs", "find_one_and_update")]
    assert _claim_ids(store) == [child.id]
    for record in (plain, parent):
        doc = store.jobs.find_one({"_id": record.id})  # type: ignore[attr-defined]
        assert doc is not None and "settle_pending" not in doc
