"""Throwaway redis-server, mongod and PostgreSQL processes for the benchmarks: the tests' own starters.

One set of server starters serves the tests and the benchmarks:
``tests/redis_servers.py``, ``tests/mongo_servers.py``, ``tests/postgres_servers.py`` (and, for
``benchmarks.fdb_contention``, ``tests/fdb_servers.py``). This module gives
them the shape the benchmark runner uses (a server picks its port when made,
lives in a temporary directory that :meth:`Server.stop` removes, and works as
a context manager).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from skunkqueue.testing.kit import free_port

# The benchmarks run from a checkout; appended, so the folder can shadow nothing installed.
_TESTS = str(Path(__file__).resolve().parent.parent / "tests")
if _TESTS not in sys.path:
    sys.path.append(_TESTS)

import fdb_servers  # noqa: E402,F401 (benchmarks.fdb_contention starts the stand-in with it)
import mongo_servers  # noqa: E402
import postgres_servers  # noqa: E402
import redis_servers  # noqa: E402


class Server:
    """One server child process, in a directory of its own that :meth:`stop` removes."""

    name = "server"

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix=f"skunqbench-{self.name}-"))
        self.port = free_port()
        self.starter: Any = None

    @property
    def url(self) -> str:
        return str(self.starter.url)

    def start(self) -> Server:
        self.starter.start()
        return self

    def stop(self) -> None:
        self.starter.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisServer(Server):
    name = "redis"

    def __init__(self) -> None:
        super().__init__()
        self.starter = redis_servers.RedisServer(self.directory, port=self.port)

    @classmethod
    def available(cls) -> bool:
        return os.access(redis_servers.REDIS_SERVER, os.X_OK) and os.access(redis_servers.REDIS_CLI, os.X_OK)

    def flush(self) -> None:
        self.starter.cli("FLUSHALL")


class MongoServer(Server):
    name = "mongod"

    def __init__(self, replset: bool = True) -> None:
        super().__init__()
        # A one-member replica set by default: workers wait on change streams, as in production.
        self.starter = mongo_servers.MongoServer(self.directory, replset=replset, port=self.port, cache_gb=0.5,
                                                 test_hooks=False)

    @classmethod
    def available(cls) -> bool:
        binary = mongo_servers.mongod_binary()
        return binary is not None and os.access(binary, os.X_OK)


class PostgresServer(Server):
    name = "postgres"

    def __init__(self) -> None:
        super().__init__()
        # durable: fsync on, as servers are run (the tests' default turns it off).
        self.starter = postgres_servers.PostgresServer(self.directory, port=self.port, durable=True)

    @classmethod
    def available(cls) -> bool:
        return postgres_servers.available()

    def database_url(self, name: str) -> str:
        """The URL of database ``name`` on this server (see :meth:`recreate`)."""
        return self.url.rsplit("/", 1)[0] + "/" + name

    def recreate(self, name: str) -> None:
        """Drop database ``name`` (whoever is connected) and make it anew: the peers' flush."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')

    def stop(self) -> None:
        self.starter.destroy()
        shutil.rmtree(self.directory, ignore_errors=True)
