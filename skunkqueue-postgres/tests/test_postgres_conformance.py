"""The shared conformance kit against a real PostgreSQL server (Debian's postgresql, started by the tests)."""

from __future__ import annotations

from typing import Any, Callable

import psycopg
import pytest

from skunkqueue.persistence import Persistence
from skunkqueue.testing import BackendUnderTest, ConformanceSuite
from skunkqueue.testing.kit import AppTransactions

SCHEMA = "skunkqueue_kit"


def foreign_writer(server: Any) -> Callable[[str, str], None]:
    def inject(queue: str, route: str) -> None:
        # What another program might leave in the table: right queue and route, pending and due,
        # but a function that is not "module:name" and a state no SkunkQueue writes.
        with psycopg.connect(server.url, autocommit=True) as conn:
            for job_id, func, state in (("foreign-1", "not a function", "pending"),
                                        ("foreign-2", "x:y", "sleeping")):
                conn.execute(f"INSERT INTO {SCHEMA}.jobs (queue, id, route, state, due, func, payload, serializer, "
                             "created) VALUES (%s, %s, %s, %s, 0, %s, 'text', 'json', 0)",
                             (queue, job_id, route, state, func))

    return inject


def misfiler(server: Any) -> Callable[[str, str, str, str, str | None], None]:
    def misfile(queue: str, job_id: str, to_queue: str, route: str, target: str | None) -> None:
        # A row's queue, route and target are what claims match on, and the record's fields too.
        with psycopg.connect(server.url, autocommit=True) as conn:
            moved = conn.execute(f"UPDATE {SCHEMA}.jobs SET queue = %s, route = %s, target = %s "
                                 "WHERE queue = %s AND id = %s", (to_queue, route, target, queue, job_id))
            assert moved.rowcount == 1

    return misfile


class PsycopgTransactions(AppTransactions):
    """An application on psycopg 3: its own connection (not autocommit) and a table of its own rows."""

    def __init__(self, url: str) -> None:
        self.url = url

    def open(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.url)
        # CREATE TABLE IF NOT EXISTS is not safe against itself: two processes opening at once can
        # both pass the check and one fails on pg_type's unique index. The lock lines them up.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('skunq-test-app-rows'))")
        conn.execute("CREATE TABLE IF NOT EXISTS app_rows (scope text NOT NULL, tag text NOT NULL)")
        conn.commit()
        return conn

    def begin(self, handle: psycopg.Connection[Any]) -> None:
        pass  # psycopg begins a transaction with the first statement

    def add_row(self, handle: psycopg.Connection[Any], scope: str, tag: str) -> None:
        handle.execute("INSERT INTO app_rows (scope, tag) VALUES (%s, %s)", (scope, tag))

    def commit(self, handle: psycopg.Connection[Any]) -> None:
        handle.commit()

    def rollback(self, handle: psycopg.Connection[Any]) -> None:
        handle.rollback()

    def close(self, handle: psycopg.Connection[Any]) -> None:
        handle.close()

    def rows(self, scope: str) -> list[str]:
        with psycopg.connect(self.url) as conn:
            return [tag for (tag,) in conn.execute("SELECT tag FROM app_rows WHERE scope = %s ORDER BY tag", (scope,))]


class TestPostgresConformance(ConformanceSuite):
    @pytest.fixture
    def backend(self, postgres: Any) -> BackendUnderTest:
        return BackendUnderTest(name="postgres", url=postgres.url, db=SCHEMA,
                                inject_foreign=foreign_writer(postgres), misfile=misfiler(postgres),
                                label="PostgreSQL 15",
                                transactions=PsycopgTransactions(postgres.url))

    # The finish that ends 2,500 dependents takes 0.08-0.5 s here, alone or beside a loaded machine
    # (load 16), yet passed its 15 s call_timeout in two CI runs and once in a local pass of eight
    # processes (8 December): the cause under that load is not found (docs/development.md). Alone,
    # in the serial pass, it costs half a second and cannot fail for the machine's load.
    @pytest.mark.serial
    def test_one_finish_ends_or_releases_thousands_of_dependents_once(self, store: Persistence,
                                                                      queue_name: str) -> None:
        super().test_one_finish_ends_or_releases_thousands_of_dependents_once(store, queue_name)
