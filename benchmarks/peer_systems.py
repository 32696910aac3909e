"""SkunkQueue and its peers (Huey, Celery, RQ, Dramatiq on Redis; Procrastinate on PostgreSQL) behind one
small interface, for ``benchmarks.peers``.

Each :class:`Peer` fires the same no-op job through its library's public API, starts its library's
own worker command (one process that runs jobs), and reads results the way its documentation
shows: a non-blocking read of one handle for throughput, the library's blocking wait for latency.
``setup`` says, per figure, which documented set-up is used and why it is that peer's fastest.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT

LATENCY_TIMEOUT = 30.0  # seconds any one fire->result round trip may take


def binary(name: str) -> str:
    """The console script ``name`` of this interpreter's environment (else the one on PATH)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKUNQ_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


class Peer:
    """One library: how to fire, read a result, wait for one, and start its worker command."""

    name = "peer"
    distribution = ""       # what to pip install when it is missing
    module = ""             # importable when installed
    stop_signal = signal.SIGTERM
    store = "redis"         # the server it runs on: "redis" or "postgres"
    setup: dict[str, str] = {}

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec(cls.module) is not None

    def open(self, url: str, latency: bool) -> None:
        """Connect a producer (``latency``: in the set-up the latency figure uses)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def fire(self, i: int) -> Any:
        """Enqueue ``noop(i)``; the library's handle."""
        raise NotImplementedError

    def done(self, handle: Any) -> bool:
        """Whether the result is there (one non-blocking read)."""
        raise NotImplementedError

    def value(self, handle: Any) -> Any:
        """The result of a done handle."""
        raise NotImplementedError

    def wait(self, handle: Any) -> Any:
        """Block until the result is there, by the library's own waiting mechanism; return it."""
        raise NotImplementedError

    def command(self, url: str, latency: bool) -> tuple[list[str], dict[str, str]]:
        """The worker command (one process that runs jobs) and its environment."""
        raise NotImplementedError


class SkunkPeer(Peer):
    name = "skunkqueue"
    distribution = "skunkqueue-redis"
    module = "skunkqueue_redis"
    backend = "redis"
    setup = {
        "worker": "skunq work -q Q -r R -c 1, its defaults (INFO log, a line per job; --prefetch auto): "
                  "a pool process and one worker process",
        "producer": "job.fire(i) one call at a time",
        "results": "handle.state / handle.result polled for processing and start-up; handle.wait() for latency",
    }

    def __init__(self) -> None:
        self.route = "peers"
        self.queue: Any = None

    def open(self, url: str, latency: bool) -> None:
        from benchmarks import jobs
        from skunkqueue import SkunkQueue

        self.queue = SkunkQueue(f"bench-peers-{uuid.uuid4().hex[:8]}", backend=self.backend, conn_url=url)
        self.job = jobs.bind(self.queue, jobs.noop, self.route)

    def close(self) -> None:
        if self.queue is not None:
            self.queue.close()
            self.queue = None

    def fire(self, i: int) -> Any:
        return self.job.fire(i)

    def done(self, handle: Any) -> bool:
        from skunkqueue import COMPLETE

        return bool(handle.state == COMPLETE)

    def value(self, handle: Any) -> Any:
        return handle.result

    def wait(self, handle: Any) -> Any:
        return handle.wait(timeout=LATENCY_TIMEOUT)

    def command(self, url: str, latency: bool) -> tuple[list[str], dict[str, str]]:
        from skunkqueue.testing.kit import kit_env

        cmd = [binary("skunq"), "work", "-q", self.queue.name, "-r", self.route, "-c", "1",
               "--backend", self.backend, "--url", url, "--path", str(ROOT), "--import", "benchmarks.jobs"]
        return cmd, _env(**kit_env(self.queue.name, [self.route]))


class HueyPeer(Peer):
    name = "huey"
    distribution = "huey"
    module = "huey"
    stop_signal = signal.SIGINT  # Huey's graceful shutdown (SIGTERM stops at once)
    setup = {
        "worker": "huey_consumer benchmarks.huey_app.huey, its defaults (-w 1 -k thread: one process; INFO log)",
        "producer": "task(i) one call at a time; RedisHuey's defaults for fire, processing and start-up",
        "results": "result.get(preserve=True) polled for processing and start-up; for latency "
                   "RedisHuey(notify_result=True) and result.get(blocking=True), which pops a notice "
                   "instead of polling every 0.1 s (faster to wait, slower to process: a write more per task)",
    }

    def open(self, url: str, latency: bool) -> None:
        from benchmarks.huey_app import make_huey

        self.notify = latency
        self.huey, self.task = make_huey("redis", url, notify_result=latency)

    def fire(self, i: int) -> Any:
        return self.task(i)

    def done(self, handle: Any) -> bool:
        return handle.get(preserve=True) is not None

    def value(self, handle: Any) -> Any:
        return handle.get(preserve=True)

    def wait(self, handle: Any) -> Any:
        return handle.get(blocking=True, timeout=LATENCY_TIMEOUT)

    def command(self, url: str, latency: bool) -> tuple[list[str], dict[str, str]]:
        return [binary("huey_consumer"), "benchmarks.huey_app.huey"], _env(
            SKUNQ_BENCH_HUEY="redis", SKUNQ_BENCH_HUEY_WHERE=url, SKUNQ_BENCH_HUEY_NOTIFY="1" if latency else "")


class CeleryPeer(Peer):
    name = "celery"
    distribution = "celery[redis]"
    module = "celery"
    setup = {
        "worker": "celery -A benchmarks.celery_app worker -P solo -c 1 --without-gossip --without-mingle "
                  "--without-heartbeat (solo: Celery's 'blocking, inline, fast' pool, jobs run in the one "
                  "worker process; prefork -c 1 adds a child and a pipe per task; the three switches drop "
                  "cluster chatter a lone worker does not need; default WARNING log, prefetch multiplier 4)",
        "producer": "task.delay(i) one call at a time; Redis broker, Redis result backend",
        "results": "AsyncResult.ready() polled for processing and start-up; AsyncResult.get() for latency "
                   "(the Redis result backend waits on pub/sub, no polling)",
    }

    def open(self, url: str, latency: bool) -> None:
        from benchmarks.celery_app import make_celery

        self.app, self.task = make_celery(url)

    def close(self) -> None:
        self.app.close()

    def fire(self, i: int) -> Any:
        return self.task.delay(i)

    def done(self, handle: Any) -> bool:
        return bool(handle.ready())

    def value(self, handle: Any) -> Any:
        return handle.result

    def wait(self, handle: Any) -> Any:
        return handle.get(timeout=LATENCY_TIMEOUT)

    def command(self, url: str, latency: bool) -> tuple[list[str], dict[str, str]]:
        from benchmarks.celery_app import QUEUE

        return [binary("celery"), "-A", "benchmarks.celery_app", "worker", "-P", "solo", "-c", "1",
                "--without-gossip", "--without-mingle", "--without-heartbeat", "-Q", QUEUE], _env(
                    SKUNQ_BENCH_REDIS=url)


class RQPeer(Peer):
    name = "rq"
    distribution = "rq"
    module = "rq"
    setup = {
        "worker": "rq worker -w rq.worker.SimpleWorker (runs jobs in the worker process: RQ's docs measure it "
                  "~6x faster than the default Worker, which forks a work horse per job; default INFO log)",
        "producer": "queue.enqueue(noop, i) one call at a time",
        "results": "job.latest_result() polled for processing and start-up; job.latest_result(timeout=...) "
                   "for latency (blocks on the results stream)",
    }

    def open(self, url: str, latency: bool) -> None:
        from redis import Redis
        from rq import Queue

        from benchmarks.rq_app import QUEUE

        self.redis = Redis.from_url(url)
        self.rq_queue = Queue(QUEUE, connection=self.redis)

    def close(self) -> None:
        self.redis.close()

    def fire(self, i: int) -> Any:
        from benchmarks.rq_app import noop

        return self.rq_queue.enqueue(noop, i)

    def done(self, handle: Any) -> bool:
        return handle.latest_result() is not None

    def value(self, handle: Any) -> Any:
        return handle.return_value()

    def wait(self, handle: Any) -> Any:
        result = handle.latest_result(timeout=int(LATENCY_TIMEOUT))
        return None if result is None else result.return_value

    def command(self, url: str, latency: bool) -> tuple[list[str], dict[str, str]]:
        from benchmarks.rq_app import QUEUE

        return [binary("rq"), "worker", "-w", "rq.worker.SimpleWorker", "--url", url, QUEUE], _env()


class DramatiqPeer(Peer):
    name = "dramatiq"
    distribution = "dramatiq[redis]"
    module = "dramatiq"
    setup = {
        "worker": "dramatiq benchmarks.dramatiq_app -p 1, its default 8 threads (a master process and one "
                  "worker process; default INFO log)",
        "producer": "actor.send(i) one call at a time; RedisBroker, Results middleware on a RedisBackend",
        "results": "message.get_result() polled for processing and start-up; message.get_result(block=True) "
                   "for latency (blocks on a list pop)",
    }

    def open(self, url: str, latency: bool) -> None:
        from benchmarks.dramatiq_app import make_dramatiq

        self.broker, self.backend, self.actor = make_dramatiq(url)

    def close(self) -> None:
        self.broker.close()

    def fire(self, i: int) -> Any:
        return self.actor.send(i)

    def done(self, handle: Any) -> bool:
        from dramatiq.results import ResultMissing

        try:
            handle.get_result(backend=self.backend)
        except ResultMissing:
            return False
        return True

    def value(self, handle: Any) -> Any:
        return handle.get_result(backend=self.backend)

    def wait(self, handle: Any) -> Any:
        return handle.get_result(backend=self.backend, block=True, timeout=int(LATENCY_TIMEOUT * 1000))

    def command(self, url: str, latency: bool) -> tuple[list[str], dict[str, str]]:
        return [binary("dramatiq"), "benchmarks.dramatiq_app", "-p", "1"], _env(SKUNQ_BENCH_REDIS=url)


class HueyNotifyPeer(HueyPeer):
    """Huey with ``notify_result=True`` for every figure: how ``make bench`` ran it before issue 28.

    Not a default peer; ``--peers huey,huey-notify-all`` measures what that set-up cost Huey."""

    name = "huey-notify-all"
    setup = {**HueyPeer.setup, "producer": "task(i) one call at a time; RedisHuey(notify_result=True) for "
                                           "every figure (not its fastest set-up for throughput)"}

    def open(self, url: str, latency: bool) -> None:
        super().open(url, latency=True)

    def command(self, url: str, latency: bool) -> tuple[list[str], dict[str, str]]:
        return super().command(url, latency=True)


class SkunkPostgresPeer(SkunkPeer):
    """SkunkQueue on PostgreSQL: the same worker command and handles, ``--backend postgres``."""

    name = "skunkqueue-pg"
    distribution = "skunkqueue-postgres"
    module = "skunkqueue_postgres"
    backend = "postgres"
    store = "postgres"
    setup = {
        "worker": "skunq work -q Q -r R -c 1 --backend postgres, its defaults (INFO log, a line per job; "
                  "--prefetch 1; LISTEN/NOTIFY wake-ups): a pool process and one worker process",
        "producer": "job.fire(i) one call at a time (one transaction each)",
        "results": "handle.state / handle.result polled for processing and start-up; handle.wait() for latency",
    }


class ProcrastinatePeer(Peer):
    """Procrastinate: PostgreSQL only, async worker; it keeps no return value, only each job's status."""

    name = "procrastinate"
    distribution = "procrastinate"
    module = "procrastinate"
    store = "postgres"
    CONCURRENCY = 10
    setup = {
        "worker": f"procrastinate --app benchmarks.procrastinate_app.app worker -q Q -c {CONCURRENCY} (one "
                  f"process, an asyncio loop; -c: jobs fetched and run at once on its connection pool, "
                  f"the default 1 fetches one job at a time; LISTEN/NOTIFY on, its default, so a deferred job "
                  f"wakes it at once instead of the 5 s poll; default log: warnings only); the task is an "
                  f"async def (a plain def runs in a thread per job)",
        "producer": "task.defer(i=i) one call at a time, App(PsycopgConnector) opened synchronously",
        "results": "Procrastinate stores no return value: a job is done when job_manager.get_job_status(id) "
                   "says succeeded, polled for processing and start-up, and polled every 2 ms for latency "
                   "(it has no blocking wait); the check reads each job back (list_jobs) and wants "
                   "status succeeded with its own argument",
    }

    def open(self, url: str, latency: bool) -> None:
        from benchmarks.procrastinate_app import make_procrastinate

        self.app, self.task = make_procrastinate(url)
        self.app.open()
        # A fresh database each round (the bench's flush): the schema is the user's one-time set-up.
        found = self.app.connector.get_sync_connector().execute_query_one(
            "SELECT to_regclass('procrastinate_jobs') AS t")
        if found["t"] is None:
            self.app.schema_manager.apply_schema()
        self.args: dict[int, int] = {}

    def close(self) -> None:
        self.app.close()

    def fire(self, i: int) -> Any:
        job_id = self.task.defer(i=i)
        self.args[job_id] = i
        return job_id

    def done(self, handle: Any) -> bool:
        from procrastinate.jobs import Status

        return bool(self.app.job_manager.get_job_status(handle) == Status.SUCCEEDED)

    def value(self, handle: Any) -> Any:
        (job,) = self.app.job_manager.list_jobs(id=handle)
        return job.task_kwargs.get("i") if job.status == "succeeded" else f"status {job.status}"

    def wait(self, handle: Any) -> Any:
        from benchmarks.common import wait_until

        wait_until(lambda: self.done(handle), LATENCY_TIMEOUT, f"procrastinate job {handle}")
        return self.args[handle]

    def command(self, url: str, latency: bool) -> tuple[list[str], dict[str, str]]:
        from benchmarks.procrastinate_app import QUEUE

        return [binary("procrastinate"), "--app", "benchmarks.procrastinate_app.app", "worker", "-q", QUEUE,
                "-c", str(self.CONCURRENCY)], _env(SKUNQ_BENCH_PG=url)


PEERS: dict[str, type[Peer]] = {p.name: p for p in (SkunkPeer, HueyPeer, CeleryPeer, RQPeer, DramatiqPeer,
                                                    HueyNotifyPeer, SkunkPostgresPeer, ProcrastinatePeer)}
DEFAULT = ["skunkqueue", "huey", "celery", "rq", "dramatiq"]  # in round order, on Redis
DEFAULT_POSTGRES = ["skunkqueue-pg", "procrastinate"]  # on PostgreSQL
