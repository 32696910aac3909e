"""The SQLite claim reads the partial index of pending rows, and a file made before it gets that index.

The index holds pending rows only, so a claim takes a row out of it and a finish never touches it
(docs/performance.md, "Session 12"). The first test fails if a claim statement reads the table or
another index instead (a changed WHERE, ORDER BY or index).
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from skunkqueue import policy
from skunkqueue.persistence.sqlite import SQLitePersistence
from skunkqueue.record import COMPLETE, PENDING, RUNNING
from skunkqueue.testing.suite_support import make_record


def _indexes(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as db:
        return {name: sql or "" for name, sql in db.execute("SELECT name, sql FROM sqlite_master WHERE type='index'")}


def test_every_claim_statement_reads_the_pending_index(tmp_path: Path) -> None:
    store = SQLitePersistence("plans", url=str(tmp_path / "q.db"))
    try:
        now = time.time()
        store.enqueue([make_record("plans", route="r", due=now - 1, priority=p) for p in (0, 0, 5, -3)])
        statements: list[str] = []
        store._db.set_trace_callback(statements.append)
        claimed = []
        for _ in range(4):  # down the priorities: the subquery, then a level at a time
            claimed += store.claim("r", "w", 30.0, 1)
        store._db.set_trace_callback(None)
        assert [r.priority for r in claimed] == [5, 0, 0, -3]
        reads = [s for s in statements if s.lstrip().upper().startswith("SELECT") and "priority" in s]
        assert reads, statements
        for sql in reads:
            plan = " ".join(str(row[3]) for row in store._db.execute("EXPLAIN QUERY PLAN " + sql))
            assert "jobs_pending" in plan and "SCAN jobs" not in plan, (sql, plan)
    finally:
        store.close()


def test_a_file_made_with_the_full_order_index_gets_the_pending_one(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    first_open = SQLitePersistence("old", url=str(path))
    now = time.time()
    handles = [make_record("old", due=now - 3 + i) for i in range(3)]
    first_open.enqueue(handles)
    first_open.close()
    with sqlite3.connect(path) as db:  # as a file written before this index: the full one, no partial one
        db.execute("DROP INDEX jobs_pending")
        db.execute("CREATE INDEX jobs_order ON jobs (queue, route, state, priority, due, id)")
        db.execute("PRAGMA user_version=0")  # what every version before the schema's version wrote
    store = SQLitePersistence("old", url=str(path))
    try:
        found = _indexes(path)
        assert "jobs_order" not in found
        assert "WHERE state='pending'" in found["jobs_pending"].replace('"', "'")
        first = store.claim("r", "w", 30.0, 1)
        assert [r.id for r in first] == [handles[0].id]
        assert store.finish(first[0].id, first[0].token, policy.completed(b"0"))
        assert [store.get(h.id).state for h in handles] == [COMPLETE, PENDING, PENDING]  # type: ignore[union-attr]
        # A retried record is pending again: back in the index, and claimed.
        second = store.claim("r", "w", 30.0, 1)[0]
        assert store.finish(second.id, second.token, policy.release(second))
        again = store.claim("r", "w", 30.0, 2)
        assert {r.id for r in again} == {handles[1].id, handles[2].id}
        assert all(store.get(r.id).state == RUNNING for r in again)  # type: ignore[union-attr]
    finally:
        store.close()
