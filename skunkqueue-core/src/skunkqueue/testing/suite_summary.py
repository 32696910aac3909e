"""Kit tests for :meth:`Persistence.summary`, the monitor's view of a queue. Mixed into ConformanceSuite."""

from __future__ import annotations

import time
from typing import Any

import pytest

from skunkqueue import housekeeping, policy
from skunkqueue.persistence import Persistence
from skunkqueue.record import COMPLETE, ERROR, KILLED, STATES, Outcome, WorkerInfo
from skunkqueue.testing.suite_support import make_record


class SummarySuite:
    def test_summary_counts_states_dead_letters_and_the_longest_wait(self, store: Persistence) -> None:
        now = time.time()
        hostile = "<b>route</b> with spaces"
        waiting = [make_record(store.queue, "a", due=now - 30), make_record(store.queue, "a", due=now - 10),
                   make_record(store.queue, "a", due=now + 3600)]
        store.enqueue(waiting + [make_record(store.queue, hostile) for _ in range(3)]
                      + [make_record(store.queue, "future", due=now + 600)])
        taken = store.claim(hostile, "w1", 30, limit=3)
        assert len(taken) == 3
        error = {"type": "ValueError", "message": "no", "traceback": ""}
        assert store.finish(taken[0].id, taken[0].token, policy.failed(taken[0], error))      # dead letter
        assert store.finish(taken[1].id, taken[1].token, policy.completed(b"1"))
        summary = store.summary(now)
        by_route = {r.route: r for r in summary.routes}
        assert [r.route for r in summary.routes] == sorted(by_route) == sorted(["a", hostile, "future"])
        assert by_route["a"].states == {**dict.fromkeys(STATES, 0), "pending": 3}
        assert by_route["a"].dead == 0 and by_route["a"].oldest_due == waiting[0].due
        assert by_route[hostile].states == {**dict.fromkeys(STATES, 0), "running": 1, "complete": 1, "error": 1}
        assert by_route[hostile].dead == 1 and by_route[hostile].oldest_due is None
        # Pending but not due yet: nobody is waiting for it.
        assert by_route["future"].states["pending"] == 1 and by_route["future"].oldest_due is None
        assert summary.dead_capped is False

    def test_summary_of_an_empty_queue(self, store: Persistence) -> None:
        assert store.summary().routes == []

    # -- a summary a store keeps as an index must not drift from the records ------------------

    @staticmethod
    def _truth(store: Persistence, ids: list[str]) -> dict[str, tuple[dict[str, int], int]]:
        """Per route: states and dead letters counted from the records themselves, one get() each."""
        found: dict[str, tuple[dict[str, int], int]] = {}
        for job_id in ids:
            record = store.get(job_id)
            if record is None:
                continue
            states, dead = found.get(record.route, (dict.fromkeys(STATES, 0), 0))
            states[record.state] += 1
            found[record.route] = (states, dead + (1 if record.state == ERROR and record.dead else 0))
        return found

    def _agrees(self, store: Persistence, ids: list[str], step: str) -> None:
        summary = {r.route: (r.states, r.dead) for r in store.summary().routes}
        truth = self._truth(store, ids)
        assert summary == truth, f"after {step}: summary {summary} but the records say {truth}"

    def test_summary_follows_every_way_a_record_moves(self, store: Persistence) -> None:
        """Claim, fail, retry, kill, lost lease, purge, delete and replayed finishes, checked after each step."""
        error = {"type": "ValueError", "message": "no", "traceback": ""}
        records = [make_record(store.queue, "a", retries=1) for _ in range(6)] + \
            [make_record(store.queue, "b") for _ in range(3)]
        ids = [r.id for r in records]
        store.enqueue(records)
        self._agrees(store, ids, "enqueue")
        one, two, three, four = store.claim("a", "w1", 30, limit=4)
        self._agrees(store, ids, "claim")
        assert store.finish(one.id, one.token, policy.completed(b"1"))
        assert not store.finish(one.id, one.token, policy.completed(b"1")), "a replayed finish applied"
        self._agrees(store, ids, "complete (and its replay)")
        # The first failure is retried (pending again, later); the second one dead-letters it.
        assert store.finish(two.id, two.token, policy.failed(two, error))
        self._agrees(store, ids, "a retried failure")
        store.finish(two.id, two.token + 1, policy.completed(b"x"))  # a stale token: must change nothing
        self._agrees(store, ids, "a finish with a stale token")
        dead = store.finish(three.id, three.token, Outcome(ERROR, error=error, dead=True))
        assert dead
        self._agrees(store, ids, "a dead letter")
        # A requested kill outranks the way back to the queue.
        assert store.request_kill(four.id)
        assert store.finish(four.id, four.token, policy.requeue(four))
        assert store.get(four.id).state == KILLED  # type: ignore[union-attr]
        self._agrees(store, ids, "a kill")
        # Retrying the dead letter, the way queue.retry does: back to pending, off the dead letters.
        again = store.get(three.id)
        assert again is not None
        assert store.finish(again.id, again.token, policy.requeue(again), expect=ERROR)
        self._agrees(store, ids, "retrying a dead letter")
        # A lost lease: the record goes back to pending under its next token.
        assert len(store.claim("b", "w2", 0.05, limit=1)) == 1
        time.sleep(0.3)
        assert housekeeping.recover_expired_leases(store) == 1
        self._agrees(store, ids, "a lost lease handed back")
        assert store.purge("b") >= 1
        self._agrees(store, ids, "purge")
        assert store.delete_finished([one.id, four.id, records[5].id]) == 2  # a pending one is left alone
        assert store.get(one.id) is None and store.get(four.id) is None and store.get(records[5].id) is not None
        self._agrees(store, ids, "delete_finished")

    def test_summary_forgets_expired_records(self, backend: Any, queue_name: str) -> None:
        error = {"type": "ValueError", "message": "no", "traceback": ""}
        with backend.open(queue_name, result_ttl=3600) as store:
            brief = [make_record(queue_name, "a") for _ in range(3)]
            for record in brief:
                record.result_ttl = 0.5
            kept = make_record(queue_name, "a")
            store.enqueue([*brief, kept])
            taken = {r.id: r for r in store.claim("a", "w", 30, limit=4)}
            done = [store.finish(taken[brief[0].id].id, taken[brief[0].id].token, policy.completed(b"1")),
                    store.finish(taken[brief[1].id].id, taken[brief[1].id].token,
                                 Outcome(ERROR, error=error, dead=True)),
                    store.finish(taken[kept.id].id, taken[kept.id].token, Outcome(ERROR, error=error, dead=True))]
            assert all(done)
            time.sleep(1.5)
            store.delete_expired(store.now())
            by_route = {r.route: r for r in store.summary().routes}
            assert by_route["a"].states == {**dict.fromkeys(STATES, 0), "running": 1, "error": 1}
            assert by_route["a"].dead == 1, "an expired dead letter is still counted"
            dead = store.list_jobs(state=ERROR, dead=True)
            assert [r.id for r in dead] == [kept.id]

    def test_deleting_finished_records(self, store: Persistence) -> None:
        records = [make_record(store.queue, "a") for _ in range(3)]
        store.enqueue(records)
        running, finished, _ = store.claim("a", "w", 30, limit=3)
        assert store.finish(finished.id, finished.token, policy.completed(b"1"))
        # Only finished records go; unknown ids are no error.
        assert store.delete_finished([running.id, finished.id, records[2].id, "no-such-id"]) == 1
        assert store.get(finished.id) is None
        assert store.get(running.id) is not None and store.get(records[2].id) is not None
        assert store.delete_finished([]) == 0
        assert store.list_jobs(state=COMPLETE) == []

    def test_paging_lists_every_matching_record_once(self, store: Persistence) -> None:
        error = {"type": "ValueError", "message": "no", "traceback": ""}
        store.enqueue([make_record(store.queue, route) for route in ("a", "b", "a", "c", "a", "b") * 4])
        for route in ("a", "b"):
            taken = store.claim(route, "w", 30, limit=5)
            for i, record in enumerate(taken[:4]):
                outcome = policy.completed(b"1") if i % 2 else Outcome(ERROR, error=error, dead=i == 0)
                assert store.finish(record.id, record.token, outcome)
        filters: list[dict[str, Any]] = [{}, {"route": "a"}, {"state": "pending"}, {"state": ERROR, "dead": True},
                                         {"state": ERROR, "dead": False}, {"route": "b", "state": COMPLETE},
                                         {"dead": True}, {"route": "nosuch"}]
        for where in filters:
            expected = sorted(r.id for r in store.list_jobs(**where, limit=10_000))
            for size in (1, 4, 100):
                seen: list[str] = []
                cursor = None
                for _ in range(100):
                    page, cursor = store.list_page(**where, limit=size, after=cursor)
                    assert len(page) <= size
                    seen += [r.id for r in page]
                    if cursor is None:
                        break
                assert cursor is None, "paging did not end"
                assert sorted(seen) == expected, f"paging {where} by {size}: {len(seen)} ids, not {len(expected)}"
        try:
            store.list_page(after="not a cursor")
        except ValueError:
            pass
        else:
            raise AssertionError("a foreign cursor was accepted")

    def test_the_registry_keeps_a_workers_async_concurrency(self, store: Persistence) -> None:
        store.register_worker(WorkerInfo(id="h:1:r:a", queue=store.queue, route="r", host="h", pid=1, concurrency=7))
        store.register_worker(WorkerInfo(id="h:2:r:b", queue=store.queue, route="r", host="h", pid=2))
        assert store.heartbeat("h:1:r:a", "busy")
        assert {w.id: w.concurrency for w in store.workers()} == {"h:1:r:a": 7, "h:2:r:b": 1}

    def test_pages_newest_first_list_every_match_once_newest_first(self, store: Persistence) -> None:
        if not store.pages_newest_first:
            pytest.skip(f"the {store.name} backend lists pages in its own order only (pages_newest_first)")
        error = {"type": "ValueError", "message": "no", "traceback": ""}
        store.enqueue([make_record(store.queue, route) for route in ("a", "b", "a", "c") * 5])
        # Claimed and finished in an order unlike their firing: the newest fired comes first all the same.
        taken = store.claim("a", "w", 30, limit=10)
        for record in reversed(taken[:6]):
            assert store.finish(record.id, record.token, Outcome(ERROR, error=error, dead=True))
        gone = store.list_jobs(route="c", limit=1)[0]
        assert store.purge("c") == 5  # deleted records leave no gap in the paging
        for where in ({}, {"route": "a"}, {"state": ERROR, "dead": True}, {"state": "pending"}, {"route": "c"}):
            expected = sorted((r.id for r in store.list_jobs(**where, limit=10_000)), reverse=True)
            for size in (1, 3, 100):
                seen: list[str] = []
                cursor = None
                for _ in range(100):
                    page, cursor = store.list_page(**where, limit=size, after=cursor, newest=True)
                    assert len(page) <= size
                    seen += [r.id for r in page]
                    if cursor is None:
                        break
                assert cursor is None, "paging did not end"
                assert seen == expected, f"newest first {where} by {size}: {seen} != {expected}"
                assert gone.id not in seen
        oldest_cursor = store.list_page(limit=1)[1]
        for foreign in ("not a cursor", oldest_cursor):
            try:
                store.list_page(after=foreign, newest=True)
            except ValueError:
                pass
            else:
                raise AssertionError(f"the cursor {foreign!r} was accepted for newest first")

    def test_a_page_costs_the_same_however_many_jobs_come_before_it(self, backend: Any, store: Persistence) -> None:
        # The monitor pages on a request at a time: a store that re-reads every earlier page (an offset
        # cursor) or reads the whole queue for each page makes a filter that matches little unbounded.
        jobs, size = 20_000, 100
        for _ in range(jobs // 2000):
            store.enqueue([make_record(store.queue, "a") for _ in range(2000)])
        cursors: list[str | None] = [None]
        seen = 0
        while True:
            page, cursor = store.list_page(limit=size, after=cursors[-1])
            seen += len(page)
            if cursor is None:
                break
            cursors.append(cursor)
            assert len(cursors) <= 2 * jobs // size, "paging did not end"
        assert seen == jobs
        with backend.open(backend.new_queue_name()) as small:
            small.enqueue([make_record(small.queue, "a") for _ in range(2 * size)])
            # Interleaved, so that the machine's load weighs on each alike; medians, so one slow call is noise.
            took: dict[str, list[float]] = {"small queue": [], "first page": [], "deep page": []}
            for _ in range(15):
                for name, where, after in (("small queue", small, None), ("first page", store, None),
                                           ("deep page", store, cursors[-3])):
                    started = time.perf_counter()
                    where.list_page(limit=size, after=after)
                    took[name].append(time.perf_counter() - started)
        median = {name: sorted(times)[7] for name, times in took.items()}
        shown = ", ".join(f"{name} {t * 1000:.1f} ms" for name, t in median.items())
        assert median["deep page"] < 4 * median["small queue"] + 0.01, f"a page of {jobs} jobs: {shown}"
        assert median["first page"] < 4 * median["small queue"] + 0.01, f"a page of {jobs} jobs: {shown}"
