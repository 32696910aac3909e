"""The shared conformance kit against a real PostgreSQL server (Debian's postgresql, started by the tests)."""

from __future__ import annotations

from typing import Any, Callable

import psycopg
import pytest

from skunkqueue.testing import BackendUnderTest, ConformanceSuite

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


class TestPostgresConformance(ConformanceSuite):
    @pytest.fixture
    def backend(self, postgres: Any) -> BackendUnderTest:
        return BackendUnderTest(name="postgres", url=postgres.url, db=SCHEMA,
                                inject_foreign=foreign_writer(postgres), label="PostgreSQL 15")
