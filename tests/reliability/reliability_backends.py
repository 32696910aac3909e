"""The backends the reliability suite runs against, built from each backend's own test helpers.

SQLite (embedded) always; Redis, MongoDB, PostgreSQL and the FoundationDB
stand-in when their distribution is installed. Their servers are started with
the helpers the backend's tests use (``tests/redis_servers.py``,
``tests/mongo_servers.py``, ``tests/postgres_servers.py``, ``tests/fdb_servers.py``).

A backend whose distribution is missing is skipped with a reason naming the
distribution. When the distribution is installed, failing to start its server
is an error, never a skip: CI installs everything and must run everything.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import signal
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

import pytest

from skunkqueue.testing.kit import BackendUnderTest, closed_port

BACKENDS = ["sqlite", "redis", "mongodb", "postgres", "fdb"]
DISTRIBUTIONS = {"sqlite": "skunkqueue", "redis": "skunkqueue-redis", "mongodb": "skunkqueue-mongo",
                 "postgres": "skunkqueue-postgres", "fdb": "skunkqueue-fdb"}


class Server:
    """A server the test may take down and bring back at the same address, data kept."""

    def down(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def up(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class Secured:
    """A way in to a server that requires credentials, and the secrets that must not leak."""

    description: str
    backend: BackendUnderTest
    secrets: list[str]
    wrong: BackendUnderTest  # same server, a wrong password


@dataclass
class Target:
    key: str                               # entry point name
    label: str                             # how the report names it
    backend: BackendUnderTest
    unreachable: BackendUnderTest          # the same backend pointed where nothing answers
    address_hint: str                      # what the unreachable error must name
    inject_foreign: Callable[[str, str], int] | None = None  # writes foreign entries, returns how many
    # Context managers started per test; None where the backend has no server or no auth.
    restartable: Callable[[Path], ContextManager[tuple[BackendUnderTest, Server]]] | None = None
    secured: Callable[[Path], ContextManager[list[Secured]]] | None = None
    notes: dict[str, str] = field(default_factory=dict)


def require_distribution(key: str) -> None:
    dist = DISTRIBUTIONS[key]
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"the {key} backend's distribution {dist!r} is not installed "
                    f"(`make test` installs it, or: pip install -e ./{dist})")


@contextlib.contextmanager
def open_target(key: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    require_distribution(key)
    opener = {"sqlite": _sqlite, "redis": _redis, "mongodb": _mongodb, "postgres": _postgres, "fdb": _fdb}[key]
    with opener(tmp_path_factory) as target:
        yield target


# -- SQLite -----------------------------------------------------------------------------


@contextlib.contextmanager
def _sqlite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    path = tmp_path_factory.mktemp("sqlite") / "reliability.db"

    def inject(queue: str, route: str) -> int:
        rows = [("foreign-json", "not json", b"x"), ("foreign-object", '["a list"]', b"x"),
                ("foreign-nofunc", '{"serializer": "json"}', b"[[],{}]")]
        with sqlite3.connect(path) as conn:
            for job_id, record, payload in rows:
                conn.execute("INSERT INTO jobs (id, queue, route, state, due, record, payload) "
                             "VALUES (?, ?, ?, 'pending', 0, ?, ?)", (job_id, queue, route, record, payload))
        conn.close()
        return len(rows)

    yield Target(
        key="sqlite", label="sqlite (embedded)",
        backend=BackendUnderTest(name="sqlite", url=str(path), label="sqlite (embedded)"),
        unreachable=BackendUnderTest(name="sqlite", url="/proc/no-such-dir/queue.db"),
        address_hint="/proc/no-such-dir/queue.db",
        inject_foreign=inject,
        notes={"restart": "embedded: no server to restart", "auth": "embedded: no server, no credentials"},
    )


# -- Redis ------------------------------------------------------------------------------


class _RedisRestartable(Server):
    def __init__(self, server: Any) -> None:
        self.server = server

    def down(self) -> None:
        self.server.kill()  # SIGKILL: only what the AOF already has survives

    def up(self) -> None:
        self.server.start()


@contextlib.contextmanager
def _redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    import redis
    import redis_servers as servers

    server = servers.RedisServer(tmp_path_factory.mktemp("redis-rel")).start()

    def inject(queue: str, route: str) -> int:
        # Entries another program could leave where the route's jobs are
        # claimed from (the layout is in skunkqueue_redis.persistence).
        base = f"sq:{{{queue}}}:"
        client = redis.Redis(port=server.port, db=5)
        now = time.time() - 1
        client.set(base + "j:foreign-string", "hello")
        client.hset(base + "j:foreign-hash", mapping={"state": "pending", "token": "x"})
        client.zadd(base + f"d:{route}", {"foreign-string": now, "foreign-hash": now, "foreign-missing": now})
        client.close()
        return 3

    @contextlib.contextmanager
    def restartable(where: Path) -> Iterator[tuple[BackendUnderTest, Server]]:
        aof = servers.RedisServer(where / "redis-aof", extra=["--appendonly", "yes",
                                                              "--appendfsync", "always"]).start()
        try:
            yield (BackendUnderTest(name="redis", url=f"127.0.0.1:{aof.port}", db="0",
                                    label="redis-server (AOF, appendfsync always)"),
                   _RedisRestartable(aof))
        finally:
            aof.stop()

    @contextlib.contextmanager
    def secured(where: Path) -> Iterator[list[Secured]]:
        password, acl_password = "Pw-requirepass-7f3a", "Pw-acl-user-c81e"
        locked = servers.RedisServer(where / "redis-auth", password=password).start()
        try:
            locked.cli("ACL", "SETUSER", "skunk", "on", f">{acl_password}", "~*", "&*", "+@all")
            base = f"127.0.0.1:{locked.port}"
            yield [
                Secured("requirepass", BackendUnderTest(name="redis", url=f"redis://:{password}@{base}", db="0"),
                        [password], BackendUnderTest(name="redis", url=f"redis://:Wrong-{password}@{base}")),
                Secured("ACL user", BackendUnderTest(name="redis", url=f"redis://skunk:{acl_password}@{base}/0"),
                        [acl_password],
                        BackendUnderTest(name="redis", url=f"redis://skunk:Wrong-{acl_password}@{base}/0")),
            ]
        finally:
            locked.stop()

    port = closed_port()
    try:
        yield Target(
            key="redis", label="redis-server",
            backend=BackendUnderTest(name="redis", url=f"127.0.0.1:{server.port}", db="5",
                                     label="redis-server"),
            unreachable=BackendUnderTest(name="redis", url=f"redis://127.0.0.1:{port}"),
            address_hint=f"127.0.0.1:{port}",
            inject_foreign=inject, restartable=restartable, secured=secured,
        )
    finally:
        server.stop()


# -- MongoDB ----------------------------------------------------------------------------


class _MongoRestartable(Server):
    def __init__(self, server: Any) -> None:
        self.server = server

    def down(self) -> None:
        self.server.stop(signal.SIGKILL)  # a crash: only what the journal has survives

    def up(self) -> None:
        self.server.start()


@contextlib.contextmanager
def _mongodb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    import mongo_servers as servers
    from pymongo import MongoClient

    db = "skunkqueue_reliability"
    # A one-node replica set: the topology that notifies workers through change streams.
    server = servers.MongoServer(tmp_path_factory.mktemp("mongod-rel"), replset=True).start()

    def inject(queue: str, route: str) -> int:
        docs = [
            {"queue": queue, "route": route, "state": "pending", "target": None, "due": 0.0,
             "note": "not a SkunkQueue job"},
            {"_id": f"foreign-{queue}", "queue": queue, "route": route, "state": "pending", "target": None,
             "due": 0.0, "token": "seven", "attempts": "none", "func": "x:y", "payload": "text"},
        ]
        with MongoClient(server.url, serverSelectionTimeoutMS=5000) as client:
            client[db]["jobs"].insert_many(docs)
        return len(docs)

    @contextlib.contextmanager
    def restartable(where: Path) -> Iterator[tuple[BackendUnderTest, Server]]:
        own = servers.MongoServer(where / "mongod-restart", replset=True).start()
        try:
            yield (BackendUnderTest(name="mongodb", url=own.url, db=db, label="mongod (one-node replica set)"),
                   _MongoRestartable(own))
        finally:
            own.stop()

    @contextlib.contextmanager
    def secured(where: Path) -> Iterator[list[Secured]]:
        user, password = "skunk-rel", "Pw-mongo-user-4d2b"
        locked = servers.MongoServer(where / "mongod-auth", auth=True).start()
        try:
            with locked.client() as client:  # the localhost exception allows the first user
                client.admin.command("createUser", user, pwd=password, roles=["root"])
            yield [Secured("--auth user",
                           BackendUnderTest(name="mongodb", url=locked.user_url(user, password), db=db),
                           [password],
                           BackendUnderTest(name="mongodb", url=locked.user_url(user, "Wrong-" + password), db=db))]
        finally:
            locked.stop()

    port = closed_port()
    try:
        yield Target(
            key="mongodb", label="mongod",
            backend=BackendUnderTest(name="mongodb", url=server.url, db=db, label="mongod"),
            unreachable=BackendUnderTest(name="mongodb", url=f"127.0.0.1:{port}", db=db),
            address_hint=f"127.0.0.1:{port}",
            inject_foreign=inject, restartable=restartable, secured=secured,
        )
    finally:
        server.stop()


# -- PostgreSQL ---------------------------------------------------------------------------


class _PostgresRestartable(Server):
    def __init__(self, server: Any) -> None:
        self.server = server

    def down(self) -> None:
        self.server.kill()  # SIGKILL: only what was committed (and so is in the WAL) survives

    def up(self) -> None:
        self.server.start()


@contextlib.contextmanager
def _postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    import postgres_servers as servers
    import psycopg
    from skunkqueue_postgres.persistence import PostgresPersistence

    schema = "skunkqueue_reliability"
    server = servers.PostgresServer(tmp_path_factory.mktemp("postgres-rel")).start()

    def inject(queue: str, route: str) -> int:
        # Rows another program could leave where the route's jobs are claimed from: a function
        # that is not "module:name", and a state SkunkQueue never writes.
        rows = [(f"foreign-func-{queue}", "not a function", "pending"), (f"foreign-state-{queue}", "x:y", "asleep")]
        with psycopg.connect(server.url, autocommit=True) as conn:
            for job_id, func, state in rows:
                conn.execute(f"INSERT INTO {schema}.jobs (queue, id, route, state, due, func, payload, serializer, "
                             "created) VALUES (%s, %s, %s, %s, 0, %s, 'text', 'json', 0)",
                             (queue, job_id, route, state, func))
        return len(rows)

    @contextlib.contextmanager
    def restartable(where: Path) -> Iterator[tuple[BackendUnderTest, Server]]:
        # fsync on, as servers are run: a crash keeps exactly what was committed.
        own = servers.PostgresServer(where / "postgres-restart", durable=True).start()
        try:
            yield (BackendUnderTest(name="postgres", url=own.url, db=schema, label="PostgreSQL 15 (fsync on)"),
                   _PostgresRestartable(own))
        finally:
            own.destroy()

    @contextlib.contextmanager
    def secured(where: Path) -> Iterator[list[Secured]]:
        password = "Pw-postgres-scram-5e1f"
        locked = servers.PostgresServer(where / "postgres-auth", password=password).start()
        try:
            wrong = locked.url.replace(password, "Wrong-" + password)
            yield [Secured("scram-sha-256 password", BackendUnderTest(name="postgres", url=locked.url, db=schema),
                           [password], BackendUnderTest(name="postgres", url=wrong, db=schema))]
        finally:
            locked.destroy()

    port = closed_port()
    try:
        # The schema exists before inject() writes into it.
        PostgresPersistence("setup", url=server.url, db=schema).close()
        yield Target(
            key="postgres", label="PostgreSQL",
            backend=BackendUnderTest(name="postgres", url=server.url, db=schema, label="PostgreSQL 15"),
            unreachable=BackendUnderTest(name="postgres", url=f"postgresql://postgres@127.0.0.1:{port}/postgres",
                                         db=schema),
            address_hint=f"127.0.0.1:{port}",
            inject_foreign=inject, restartable=restartable, secured=secured,
        )
    finally:
        server.destroy()


# -- FoundationDB stand-in ----------------------------------------------------------------


@contextlib.contextmanager
def _fdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    import fdb_servers as servers
    work = tmp_path_factory.mktemp("fdb-rel")
    root = f"skunkqueue-reliability-{uuid.uuid4().hex[:8]}"
    real = servers.REAL_CLUSTER_FILE
    cluster = None
    if real:
        cluster_file, env, label = real, {}, "fdb (real cluster)"
    else:
        servers.activate_standin()  # this process and every worker import the stand-in `fdb`
        cluster = servers.StandInCluster(work).start()
        cluster_file, env, label = cluster.cluster_file, servers.standin_env(), servers.STANDIN_LABEL
    def inject(queue: str, route: str) -> int:
        return int(servers.write_foreign_entries(cluster_file, root, queue, route))

    nowhere = work / "unreachable.cluster"
    nowhere.write_text(f"standin:nobody@127.0.0.1:{closed_port()}\n")
    try:
        yield Target(
            key="fdb", label=label,
            backend=BackendUnderTest(name="fdb", url=cluster_file, db=root, env=env, label=label),
            unreachable=BackendUnderTest(name="fdb", url=str(nowhere), db=root, env=env),
            address_hint=str(nowhere),
            inject_foreign=inject,
            notes={"restart": "the stand-in keeps its data in memory: restarting it loses everything by design",
                   "auth": "FoundationDB has no passwords (it uses mutual TLS)"},
        )
    finally:
        if cluster is not None:
            cluster.stop()
