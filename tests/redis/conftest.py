"""Throwaway Redis servers for the redis backend's tests (never the shared 6379 instance)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest


def _load_servers():
    # Loaded by path under a unique name: "servers" is a likely name for other
    # backends' helpers too, and tests/redis must not become a package named "redis".
    name = "skunkqueue_tests_redis_servers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("servers.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


servers = _load_servers()
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
