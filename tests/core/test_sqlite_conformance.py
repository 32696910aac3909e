"""The conformance kit on the embedded SQLite backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from skunkqueue.testing import BackendUnderTest, ConformanceSuite


def _inject_foreign(path: Path):
    import sqlite3

    def inject(queue: str, route: str) -> None:
        # A row another program might have written: no func, bad JSON.
        with sqlite3.connect(path) as conn:
            conn.execute("INSERT INTO jobs (id, queue, route, state, due, record, payload) "
                         "VALUES ('foreign-1', ?, ?, 'pending', 0, 'not json', 'x')", (queue, route))
    return inject


def _misfile(path: Path):
    import sqlite3

    def misfile(queue: str, job_id: str, to_queue: str, route: str, target: str | None) -> None:
        # The row's columns say where it is claimed, and they are the record's fields too.
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE jobs SET queue = ?, route = ?, target = ? WHERE queue = ? AND id = ?",
                         (to_queue, route, target, queue, job_id))
    return misfile


class TestSQLiteConformance(ConformanceSuite):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> BackendUnderTest:
        path = tmp_path / "queue.db"
        return BackendUnderTest(name="sqlite", url=str(path), inject_foreign=_inject_foreign(path),
                                misfile=_misfile(path),
                                label="sqlite (embedded)")
