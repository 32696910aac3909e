"""What a backend's tests hand to the conformance kit."""

from __future__ import annotations

import os
import random
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from skunkqueue.backends import open_backend
from skunkqueue.persistence import Persistence
from skunkqueue.queue import SkunkQueue

# Workers run a job only if its function was declared on *their* queue and
# route. The kit's tests use a fresh queue (and their own routes) each, so the
# pools it starts tell their job modules which ones through these variables;
# a job module declares its jobs with :func:`kit_queue` and :func:`kit_routes`.
KIT_QUEUE_ENV = "SKUNQ_KIT_QUEUE"
KIT_ROUTES_ENV = "SKUNQ_KIT_ROUTES"


def kit_queue(default: str, **options: Any) -> SkunkQueue:
    """The queue a test job module declares its jobs on: the test's queue inside a kit pool
    (``options``: the queue's, e.g. ``result_ttl``)."""
    return SkunkQueue(os.environ.get(KIT_QUEUE_ENV) or default, **options)


def kit_routes(default: Sequence[str]) -> list[str]:
    """The routes a test job module declares its jobs for: the pool's routes inside a kit pool."""
    routes = [r for r in os.environ.get(KIT_ROUTES_ENV, "").split(",") if r]
    return routes or list(default)


def _ephemeral_low() -> int:
    """The first port the kernel hands out for outgoing connections and ``bind(0)`` (Linux: 32768)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(also_free: int | None = None) -> int:
    """A free TCP port on 127.0.0.1 for a test server; with ``also_free``, port + also_free is free
    too (a Redis Cluster node's bus listens at port + 10000).

    Picked below the kernel's ephemeral range, so that a client's outgoing connection or a
    :func:`closed_port` of another test process (pytest-xdist runs several) cannot take the
    port between this check and the server's bind.
    """
    high = _ephemeral_low() - 1 - (also_free or 0)
    low = 20000 if high - 20000 >= 1000 else 1024
    for _ in range(200):
        port = random.randint(low, high)
        if _port_is_free(port) and (also_free is None or _port_is_free(port + also_free)):
            return port
    raise RuntimeError("no free loopback port found")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def closed_port() -> int:
    """A loopback port nobody listens on, for "cannot reach the store" tests.

    The system hands out a port and the socket is closed at once, so nothing
    else was using it. It comes from the kernel's ephemeral range, which
    :func:`free_port` keeps its servers out of; use it only to be refused.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def append_line(path: str, line: str) -> None:
    """Append one line to a file outside the queue, where tests count executions.

    One write() of a short line on an O_APPEND file: lines from several
    processes never interleave.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def kit_env(queue: str, routes: Sequence[str]) -> dict[str, str]:
    """What a worker process needs so that the kit's job modules declare for ``queue``/``routes``."""
    return {KIT_QUEUE_ENV: queue, KIT_ROUTES_ENV: ",".join(dict.fromkeys(routes))}


class AppTransactions:
    """How the kit's TransactionalSuite acts as an application: its own handle, rows and commits.

    A backend's tests subclass it for their store (e.g. a psycopg connection
    and a table of rows) and pass an instance as ``BackendUnderTest.transactions``.
    The instance travels to other processes, so it must pickle (plain fields).
    ``scope`` keeps one test's rows apart from another's.
    """

    def open(self) -> Any:
        """A new handle of the application's own, as ``fire(..., using=handle)`` takes it."""
        raise NotImplementedError

    def begin(self, handle: Any) -> None:
        """Start a transaction on the handle (a no-op where the first write starts one)."""
        raise NotImplementedError

    def add_row(self, handle: Any, scope: str, tag: str) -> None:
        """Write one application row in the handle's open transaction."""
        raise NotImplementedError

    def commit(self, handle: Any) -> None:
        raise NotImplementedError

    def rollback(self, handle: Any) -> None:
        raise NotImplementedError

    def close(self, handle: Any) -> None:
        raise NotImplementedError

    def rows(self, scope: str) -> list[str]:
        """The tags of the committed rows of ``scope``, read through a handle of its own."""
        raise NotImplementedError


@dataclass
class BackendUnderTest:
    """How to reach the backend under test.

    ``name`` is the entry point name (what ``--backend`` takes); ``url`` and
    ``db`` are what ``--url`` and ``--db`` take; ``options`` go to the
    backend's constructor (in-process only). ``env`` is added to the
    environment of every worker process the kit starts (e.g. to point a
    stand-in at its server). ``inject_foreign(queue, route)`` optionally
    writes something into the store, where the route's jobs live, that
    SkunkQueue did not write; the kit checks that workers survive it.
    ``label`` names the target in reports (say "stand-in" if it is one).
    ``misfile(queue, job_id, to_queue, route, target)`` optionally moves a
    pending record of ``queue``, as a store writer could, to where workers of
    ``to_queue`` and ``route`` (and, with ``target``, only that worker) claim
    it, changing as little of what the store holds as the store allows; the
    kit checks that a signed record moved so never runs.
    ``transactions`` (see :class:`AppTransactions`) lets the TransactionalSuite
    fire jobs inside the store's own transactions (``fire(..., using=...)``).
    """

    name: str
    url: str | None = None
    db: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    inject_foreign: Callable[[str, str], None] | None = None
    misfile: Callable[[str, str, str, str, str | None], None] | None = None
    label: str = ""
    transactions: AppTransactions | None = None

    def new_queue_name(self) -> str:
        return f"kit-{uuid.uuid4().hex[:12]}"

    def open(self, queue: str, **options: Any) -> Persistence:
        merged = {**self.options, **options}
        return open_backend(queue, self.name, url=self.url, db=self.db, **merged)

    def cli_args(self) -> list[str]:
        args = ["--backend", self.name]
        if self.url is not None:
            args += ["--url", self.url]
        if self.db is not None:
            args += ["--db", self.db]
        return args

    def process_env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        env.update(extra)
        return env
