"""Kit tests for :meth:`Persistence.summary`, the monitor's view of a queue. Mixed into ConformanceSuite."""

from __future__ import annotations

import time

from skunkqueue import policy
from skunkqueue.persistence import Persistence
from skunkqueue.record import STATES
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
