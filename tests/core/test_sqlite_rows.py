"""What a SQLite row holds: a record's JSON leaves out the fields at their defaults, and reads back whole.

The JSON is half as long for a plain job (and the claim and the finish each encode and decode it
once); a row an older version wrote, every field spelled out, still reads the same.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path

from skunkqueue.persistence.sqlite import SQLitePersistence
from skunkqueue.record import JobRecord
from skunkqueue.testing.suite_support import make_record


def _stored_json(path: Path, job_id: str) -> dict[str, object]:
    with sqlite3.connect(path) as conn:
        (text,) = conn.execute("SELECT record FROM jobs WHERE id=?", (job_id,)).fetchone()
    found: dict[str, object] = json.loads(text)
    return found


def test_a_plain_record_stores_only_what_differs_from_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    store = SQLitePersistence("q", url=str(path))
    record = make_record("q")
    store.enqueue([record])
    stored = _stored_json(path, record.id)
    assert {"history", "parents", "limit_key", "owner", "error", "serializer", "dead"}.isdisjoint(stored), stored
    assert store.get(record.id) == record
    store.close()


def test_every_field_away_from_its_default_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    store = SQLitePersistence("q", url=str(path))
    parent = make_record("q")
    record = make_record("q", serializer="pickle", retries=3, retry_backoff=0.5, timeout=9.0, key="k{}:$.",
                         result_ttl=60.0, parents=[parent.id], inputs=[parent.id], on_failure="run",
                         workflow="wf", priority=-2, limit_key="lk", limit_concurrency=2, limit_interval=0.25,
                         limit_burst=3, history=[{"attempt": 1, "how": "lost"}], history_dropped=4)
    store.enqueue([parent, record])
    got = store.get(record.id)
    assert got is not None
    assert {f.name: getattr(got, f.name) for f in dataclasses.fields(JobRecord)} == {
        f.name: getattr(record, f.name) for f in dataclasses.fields(JobRecord)}
    store.close()


def test_a_row_with_every_field_spelled_out_reads_the_same(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    store = SQLitePersistence("q", url=str(path))
    record = make_record("q")
    store.enqueue([record])
    full = {name: value for name, value in vars(record).items()
            if name not in {"id", "queue", "route", "target", "state", "due", "lease_until", "payload", "result",
                            "priority", "limit_key"}}
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE jobs SET record=? WHERE id=?", (json.dumps(full), record.id))
    assert store.get(record.id) == record
    [claimed] = store.claim("r", "w", 30.0)
    assert claimed.id == record.id and claimed.attempts == 1
    store.close()
