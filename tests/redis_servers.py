"""Start and stop throwaway redis-server processes (and a 3-master cluster) for the tests.

Every server listens on a free loopback port in its own directory, so the
tests never touch a Redis someone else is using.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from skunkqueue.testing.kit import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


@dataclass
class RedisServer:
    """One redis-server child process."""

    directory: Path
    port: int = 0
    password: str | None = None
    extra: list[str] = field(default_factory=list)
    prefix: list[str] = field(default_factory=list)  # a command to run it under: valgrind, taskset
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}"

    @property
    def unix_socket(self) -> Path:
        return self.directory / "redis.sock"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.port = self.port or free_port(10000 if "--cluster-enabled" in self.extra else None)
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--dir", str(self.directory), "--unixsocket", str(self.unix_socket),
                "--unixsocketperm", "700", "--logfile", str(self.directory / "redis.log")]
        if "--appendonly" not in self.extra:
            args += ["--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(self.prefix + args + self.extra, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log()}")
            if self.cli("PING").strip() == "PONG":
                return self
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer: {self.log()}")

    def cli(self, *args: str) -> str:
        auth = ["--no-auth-warning", "-a", self.password] if self.password else []
        done = subprocess.run([REDIS_CLI, "-p", str(self.port), *auth, *args], capture_output=True,
                              text=True, timeout=10)
        return done.stdout

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text()[-2000:] if path.exists() else "(no log)"

    def kill(self) -> None:
        """SIGKILL: no chance to write anything more."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


@dataclass
class RedisClusterServers:
    """Three masters, no replicas, made into one cluster with redis-cli."""

    directory: Path
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:1])

    def start(self, timeout: float = 30.0) -> RedisClusterServers:
        for i in range(3):
            node_dir = self.directory / f"node{i}"
            extra = ["--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                     "--cluster-node-timeout", "5000"]
            self.nodes.append(RedisServer(node_dir, extra=extra).start())
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        created = subprocess.run([REDIS_CLI, "--cluster", "create", *addresses, "--cluster-replicas", "0",
                                  "--cluster-yes"], capture_output=True, text=True, timeout=60)
        if created.returncode != 0:
            raise RuntimeError(f"cluster create failed: {created.stdout}{created.stderr}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all("cluster_state:ok" in n.cli("CLUSTER", "INFO") for n in self.nodes):
                return self
            time.sleep(0.1)
        raise RuntimeError("the cluster never reached cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def scratch_dir(base: Path, name: str) -> Path:
    path = base / f"{name}-{os.getpid()}-{random.randint(0, 1 << 30):x}"
    path.mkdir(parents=True)
    return path


REDIS_SENTINEL = shutil.which("redis-sentinel") or "/usr/bin/redis-sentinel"


@dataclass
class RedisSentinelServers:
    """A primary, one replica and three redis-sentinel processes watching them as ``service``.

    Both data nodes keep an append-only file (``appendfsync everysec``); replication is
    Redis' usual asynchronous one. ``down-after-milliseconds 1000`` makes a failover take
    a few seconds rather than the default half minute.
    """

    directory: Path
    service: str = "mymaster"
    primary: RedisServer | None = None
    replica: RedisServer | None = None
    sentinels: list[subprocess.Popen[bytes]] = field(default_factory=list)
    sentinel_ports: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}"

    def start(self, timeout: float = 30.0) -> RedisSentinelServers:
        durable = ["--appendonly", "yes", "--appendfsync", "everysec"]
        self.primary = RedisServer(self.directory / "a", extra=durable).start()
        self.replica = RedisServer(self.directory / "b", extra=[
            *durable, "--replicaof", "127.0.0.1", str(self.primary.port)]).start()
        for i in range(3):
            where = self.directory / f"sentinel{i}"
            where.mkdir(parents=True)
            port = free_port()
            conf = where / "sentinel.conf"  # sentinel rewrites its file: one each, writable
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {where}\nlogfile {where / 'sentinel.log'}\n"
                f"sentinel monitor {self.service} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {self.service} 1000\n"
                f"sentinel failover-timeout {self.service} 5000\n"
                f"sentinel parallel-syncs {self.service} 1\n")
            self.sentinels.append(subprocess.Popen([REDIS_SENTINEL, str(conf)], stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL))
            self.sentinel_ports.append(port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Ready when every sentinel knows the replica and the other two sentinels.
            if all(self._sentinel_sees(port) for port in self.sentinel_ports) and \
                    "master_link_status:up" in self.replica.cli("INFO", "replication"):
                return self
            time.sleep(0.1)
        raise RuntimeError(f"the sentinels never saw the replica and each other: {self.sentinel_log(0)}")

    def _sentinel_sees(self, port: int) -> bool:
        out = subprocess.run([REDIS_CLI, "-p", str(port), "SENTINEL", "MASTER", self.service],
                             capture_output=True, text=True, timeout=10).stdout.split()
        fields = dict(zip(out[::2], out[1::2]))
        return fields.get("num-slaves") == "1" and fields.get("num-other-sentinels") == "2"

    def current_primary_port(self) -> int:
        out = subprocess.run([REDIS_CLI, "-p", str(self.sentinel_ports[0]), "SENTINEL",
                              "GET-MASTER-ADDR-BY-NAME", self.service],
                             capture_output=True, text=True, timeout=10).stdout.split()
        return int(out[1])

    def sentinel_log(self, i: int) -> str:
        path = self.directory / f"sentinel{i}" / "sentinel.log"
        return path.read_text()[-2000:] if path.exists() else "(no log)"

    def stop(self) -> None:
        for process in self.sentinels:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
        for node in (self.primary, self.replica):
            if node is not None:
                node.stop()
