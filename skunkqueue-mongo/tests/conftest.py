"""Throwaway mongod servers for the mongodb backend's tests: a standalone and a one-node replica set."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import mongo_servers as servers
import pytest

MongoServer = servers.MongoServer

AUTH_USER, AUTH_PASSWORD = "skunk", "s3cr3t-Pa55word"
# The database every test module here uses (they say DB); queue names keep tests apart.
TEST_DB = "skunkqueue_backend_tests"


@pytest.fixture(scope="session")
def mongo_standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    server = MongoServer(tmp_path_factory.mktemp("mongod-standalone")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mongo_replset(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    server = MongoServer(tmp_path_factory.mktemp("mongod-rs"), replset=True, cache_gb=0.5).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mongo_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A standalone with --auth; its one user was created through the localhost exception."""
    server = MongoServer(tmp_path_factory.mktemp("mongod-auth"), auth=True).start()
    with server.client() as client:
        client.admin.command("createUser", AUTH_USER, pwd=AUTH_PASSWORD, roles=["root"])
    server.user, server.password = AUTH_USER, AUTH_PASSWORD
    yield server
    server.stop()


@pytest.fixture
def queue_name() -> str:
    return f"mq-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def opened() -> Iterator[Callable[..., Any]]:
    """Open MongoPersistence instances (in the tests' own database) that are closed after the test."""
    from skunkqueue_mongo.persistence import MongoPersistence

    instances: list[MongoPersistence] = []

    def open_(queue: str, url: str, db: str | None = TEST_DB, **options: Any) -> MongoPersistence:
        instance = MongoPersistence(queue, url=url, db=db, **options)
        instances.append(instance)
        return instance

    yield open_
    for instance in instances:
        instance.close()


@pytest.fixture(params=["standalone", "replset"])
def mongo(request: pytest.FixtureRequest) -> Any:
    """Each test using this runs once per topology."""
    return request.getfixturevalue(f"mongo_{request.param}")


@pytest.fixture
def make_mongo(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """Start a server of the test's own (for tests that stop or restart it)."""
    started: list[Any] = []

    def make(**options: Any) -> Any:
        server = MongoServer(tmp_path / f"mongod-{len(started)}", **options).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
