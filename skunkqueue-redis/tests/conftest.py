"""Throwaway Redis servers for the redis backend's tests (never the shared 6379 instance)."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest
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
def free_port() -> int:
    return servers.free_port()
