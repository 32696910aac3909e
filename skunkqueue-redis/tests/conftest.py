"""Throwaway Redis servers for the redis backend's tests (never the shared 6379 instance)."""

from __future__ import annotations

import uuid
from typing import Callable, Iterator

import pytest
import redis
import redis_servers as servers

RedisServer = servers.RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.RedisClusterServers]:
    cluster = servers.RedisClusterServers(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def start_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RedisServer]]:
    """Start an extra server for one test (password, persistence); stopped afterwards."""
    started: list[RedisServer] = []

    def start(password: str | None = None, extra: list[str] | None = None) -> RedisServer:
        server = RedisServer(tmp_path_factory.mktemp("redis-extra"), password=password,
                             extra=list(extra or [])).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def queue_name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    return f"127.0.0.1:{redis_server.port}"


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain redis-py client on the database the backend tests use, to look under the backend."""
    client = redis.Redis(port=redis_server.port, db=5)
    yield client
    client.close()


@pytest.fixture
def free_port() -> int:
    return servers.free_port()
