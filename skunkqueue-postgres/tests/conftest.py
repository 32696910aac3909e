"""Throwaway PostgreSQL servers for the postgres backend's tests (tests/postgres_servers.py)."""

from __future__ import annotations

import uuid
from typing import Any, Callable, Iterator

import postgres_servers as servers
import pytest

PostgresServer = servers.PostgresServer


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    if not servers.available():
        pytest.fail("PostgreSQL is not installed: run scripts/ensure-servers (apt-get install postgresql)")
    server = PostgresServer(tmp_path_factory.mktemp("postgres")).start()
    yield server
    server.destroy()


@pytest.fixture
def queue_name() -> str:
    return f"pq-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def opened() -> Iterator[Callable[..., Any]]:
    """Open PostgresPersistence instances that are closed after the test."""
    from skunkqueue_postgres.persistence import PostgresPersistence

    instances: list[PostgresPersistence] = []

    def open_(queue: str, url: str, db: str | None = None, **options: Any) -> PostgresPersistence:
        instance = PostgresPersistence(queue, url=url, db=db, **options)
        instances.append(instance)
        return instance

    yield open_
    for instance in instances:
        instance.close()


@pytest.fixture
def make_postgres() -> Iterator[Callable[..., PostgresServer]]:
    """Start a server of the test's own (for tests that stop, kill or restart it)."""
    started: list[PostgresServer] = []

    def make(**options: Any) -> PostgresServer:
        server = PostgresServer(**options).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.destroy()
