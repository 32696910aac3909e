"""Housekeeping hands back every expired lease it can, even when one record is held (RecordHeld).

MongoDB raises ``RecordHeld`` for a record a transaction holds (one a SIGKILLed worker left open,
until the server aborts it); the other expired leases must not wait for it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from skunkqueue.errors import BackendUnavailable, RecordHeld
from skunkqueue.housekeeping import recover_expired_leases
from skunkqueue.persistence.sqlite import SQLitePersistence
from skunkqueue.record import PENDING
from skunkqueue.testing.suite_support import make_record


class HoldsOne(SQLitePersistence):
    """A real SQLite store whose finish of one record raises what MongoDB raises for a held one."""

    held: str = ""
    error: type[BackendUnavailable] = RecordHeld

    def finish(self, job_id: str, token: int, outcome: Any, **kwargs: Any) -> bool:
        if job_id == self.held:
            raise self.error(f"{job_id} is held")
        return super().finish(job_id, token, outcome, **kwargs)


def _expired(store: HoldsOne, n: int) -> list[str]:
    records = [make_record(store.queue) for _ in range(n)]
    store.enqueue(records)
    claimed = store.claim("r", "w", 0.05, limit=n)
    assert len(claimed) == n
    time.sleep(0.2)
    return [r.id for r in records]


def test_a_held_record_does_not_stop_the_others(tmp_path: Path) -> None:
    store = HoldsOne("q", url=str(tmp_path / "q.db"))
    try:
        ids = _expired(store, 3)
        store.held = ids[0]  # the first expired lease housekeeping looks at, or not: any of them
        assert recover_expired_leases(store) == 2
        assert [store.get(i).state for i in ids[1:]] == [PENDING, PENDING]  # type: ignore[union-attr]
        store.held = ""  # the transaction was aborted: the next round hands it back
        assert recover_expired_leases(store) == 1
    finally:
        store.close()


def test_an_unreachable_store_still_stops_housekeeping_at_once(tmp_path: Path) -> None:
    store = HoldsOne("q", url=str(tmp_path / "q.db"))
    try:
        ids = _expired(store, 2)
        store.held, store.error = ids[0], BackendUnavailable
        with pytest.raises(BackendUnavailable):  # not a held record: the store is down, stop the round
            recover_expired_leases(store)
    finally:
        store.close()
