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


class TestSQLiteConformance(ConformanceSuite):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> BackendUnderTest:
        path = tmp_path / "queue.db"
        return BackendUnderTest(name="sqlite", url=str(path), inject_foreign=_inject_foreign(path),
                                label="sqlite (embedded)")
