"""The conformance kit on the embedded SQLite backend."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from skunkqueue.testing import BackendUnderTest, ConformanceSuite
from skunkqueue.testing.kit import AppTransactions


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


class SqliteTransactions(AppTransactions):
    """An application on the sqlite3 module: its own connection to the queue's file, a table of its rows."""

    def __init__(self, path: str) -> None:
        self.path = path

    def open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=60)
        conn.execute("CREATE TABLE IF NOT EXISTS app_rows (scope TEXT NOT NULL, tag TEXT NOT NULL)")
        conn.commit()
        return conn

    def begin(self, handle: sqlite3.Connection) -> None:
        pass  # the sqlite3 module begins a transaction before the first write

    def add_row(self, handle: sqlite3.Connection, scope: str, tag: str) -> None:
        handle.execute("INSERT INTO app_rows (scope, tag) VALUES (?, ?)", (scope, tag))

    def commit(self, handle: sqlite3.Connection) -> None:
        handle.commit()

    def rollback(self, handle: sqlite3.Connection) -> None:
        handle.rollback()

    def close(self, handle: sqlite3.Connection) -> None:
        handle.close()

    def rows(self, scope: str) -> list[str]:
        with sqlite3.connect(self.path, timeout=60) as conn:
            return [tag for (tag,) in conn.execute("SELECT tag FROM app_rows WHERE scope = ? ORDER BY tag", (scope,))]


class TestSQLiteConformance(ConformanceSuite):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> BackendUnderTest:
        path = tmp_path / "queue.db"
        return BackendUnderTest(name="sqlite", url=str(path), inject_foreign=_inject_foreign(path),
                                misfile=_misfile(path), transactions=SqliteTransactions(str(path)),
                                label="sqlite (embedded)")
