"""``SkunkQueue``: where jobs are declared, fired, inspected and killed."""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence

from skunkqueue import (
    config,
    flow,
    headers,
    hooks,
    housekeeping,
    policy,
    serializer,
    signature_policy,
    signing,
    workflow,
)
from skunkqueue.backends import load, open_backend
from skunkqueue.errors import ConfigurationError, JobNotFound, PayloadTooLarge
from skunkqueue.handle import QueueLike
from skunkqueue.housekeeping import WORKER_TTL
from skunkqueue.job import Job, JobHandle, check_name, check_result_ttl
from skunkqueue.persistence import DEFAULT_RESULT_TTL, Persistence
from skunkqueue.record import COMPLETE, FINISHED_STATES, KILLED, PENDING, RUNNING, STATES, JobRecord, WorkerInfo, new_id

log = logging.getLogger("skunkqueue")

QUEUE_TYPES = ("direct", "broadcast")


class SkunkQueue:
    """A named queue on a backend.

    ``SkunkQueue('demo', backend='redis', conn_url='localhost:6379', dbname='0')``, or
    ``SkunkQueue('demo', conn_url='redis://localhost:6379/0')`` (the scheme names the
    backend). Without ``backend`` and ``conn_url`` the store comes from ``SKUNQ_BACKEND``,
    ``SKUNQ_URL`` and ``SKUNQ_DB``, else it is the embedded SQLite one: the rule
    ``skunq work`` and ``skunq web`` follow too (:mod:`skunkqueue.config`).
    """

    def __init__(self, name: str, backend: str | None = None, conn_url: str | None = None,
                 dbname: str | None = None, queue_type: str = "direct", serializer: str = "json",
                 result_ttl: float = DEFAULT_RESULT_TTL, **options: Any) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError("A queue needs a non-empty name, e.g. SkunkQueue('emails').")
        check_name(name, "queue")
        check_result_ttl(result_ttl)
        if queue_type not in QUEUE_TYPES:
            raise ConfigurationError(f"queue_type must be 'direct' or 'broadcast', not {queue_type!r}.")
        self.name = name
        self.store = config.resolve(backend, conn_url, dbname)
        self.backend = self.store.backend
        self.conn_url = self.store.url
        self.dbname = self.store.db
        self.queue_type = queue_type
        self.serializer = _check_serializer(serializer)
        self.result_ttl = result_ttl
        self.options = options
        self._local = threading.local()
        self._signing_notice: tuple[float, str | None] | None = None  # (read at, stored policy)
        self._async_conn: Persistence | None = None
        # Fail fast on an unknown backend name, before any job is declared.
        self._backend_class = load(self.backend)
        self._backend_class.check_names(name)  # a name the store cannot hold fails here, not at a write

    def _open(self) -> Persistence:
        """A new connection to this queue's backend."""
        return open_backend(self.name, self.backend, url=self.conn_url, db=self.dbname,
                            result_ttl=self.result_ttl, **self.options)

    @property
    def persistence(self) -> Persistence:
        """This thread's connection to the backend (opened on first use)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._open()
        return conn

    @property
    def apersistence(self) -> Persistence:
        """The connection ``afire`` and ``aresult`` use: its own, so that it never
        shares one with this thread's synchronous calls (see Persistence.aenqueue)."""
        if self._async_conn is None:
            self._async_conn = self._open()
        return self._async_conn

    async def aopen(self) -> Persistence:
        """:attr:`apersistence` for coroutines: the first call opens it (a connect and a ping) on a
        thread, so that not even that blocks the event loop."""
        if self._async_conn is None:
            import asyncio  # here: a producer that never awaits never loads it

            conn = await asyncio.to_thread(self._open)
            if self._async_conn is None:
                self._async_conn = conn
            else:  # another coroutine opened one meanwhile: keep that one
                conn.close()
        return self._async_conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        if self._async_conn is not None:
            self._async_conn.close()
            self._async_conn = None

    # -- declaring and firing ---------------------------------------------------

    def event(self, routes: Sequence[str], *, retries: int = 0, retry_backoff: float = 1.0,
              timeout: float | None = None, result_ttl: float | None = None, priority: int = 0,
              limit: flow.Limit | None = None) -> Callable[[Callable[..., Any]], Job]:
        """Decorator: make a function a Job that workers on ``routes`` run.

        ``result_ttl`` (seconds) overrides the queue's for this job's finished records.
        ``priority`` (default 0; higher runs first within a route) and ``limit``
        (a :class:`skunkqueue.Limit`): see :mod:`skunkqueue.flow`.
        """
        if not isinstance(routes, str):
            self._backend_class.check_names(self.name, list(routes or []))

        def decorate(func: Callable[..., Any]) -> Job:
            return Job(self, func, routes, retries=retries, retry_backoff=retry_backoff, timeout=timeout,
                       result_ttl=result_ttl, priority=priority, limit=limit)
        return decorate

    job = event

    def periodic(self, *, routes: Sequence[str], every: timedelta | float | None = None,
                 cron: str | None = None, tz: str = "UTC", misfire_grace: float = 60.0,
                 catch_up: bool = False, retries: int = 0, retry_backoff: float = 1.0,
                 timeout: float | None = None, result_ttl: float | None = None, priority: int = 0,
                 limit: flow.Limit | None = None) -> Callable[[Callable[..., Any]], Job]:
        """Decorator: a Job that ``skunq work`` pools fire once per slot of a schedule.

        Exactly one of ``every`` (a timedelta or seconds) and ``cron`` (in
        ``tz``). See :mod:`skunkqueue.periodic`. ``priority`` and ``limit``: as
        for :meth:`event`.
        """
        # Here, not at the top: a producer that declares no schedule never loads cronsim.
        from skunkqueue import periodic as schedules

        if self.queue_type == "broadcast":  # a slot is one record, by its idempotency key
            raise ConfigurationError("Periodic jobs need a direct queue: a broadcast's deliveries depend on "
                                     "which workers are alive, so a slot could not be fired exactly once.")

        def decorate(func: Callable[..., Any]) -> Job:
            job = Job(self, func, routes, retries=retries, retry_backoff=retry_backoff, timeout=timeout,
                      result_ttl=result_ttl, priority=priority, limit=limit)
            try:
                job.check_arguments((), {})
            except TypeError:
                raise ConfigurationError(f"{job.name} is periodic, so it is fired with no arguments; "
                                         "give its parameters defaults.") from None
            job.schedule = schedules.Schedule(
                job, every=None if every is None else schedules.every_seconds(every), cron=cron, tz=tz,
                misfire_grace=misfire_grace, catch_up=catch_up)
            schedules.declare(job.schedule)
            return job
        return decorate

    def _enqueue(self, job: Job, calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
                 due: float, keys: list[str | None] | None = None, using: Any = None,
                 after: Sequence[Any] | None = None, on_failure: str | None = None,
                 priority: int | None = None) -> list[JobHandle]:
        backend = self.persistence
        if self._signing_stale(backend):
            self._signing_notice = (time.monotonic(), backend.get_setting(signature_policy.SETTING))
        live = self.live_workers() if job.declared_on.queue_type == "broadcast" else None
        per_call = self._records(backend, job, calls, due, keys, live, priority=priority)
        flat = [record for records in per_call for record in records]
        if after is not None or on_failure is not None:
            workflow.depend(self, backend, flat, after or [], on_failure, using)
        keyed = keys is not None and any(k is not None for k in keys)
        if not hooks.implemented("job_sending"):  # no plugin to tell: _sending's work without its context
            self._seal(backend, flat, False)
            holders = backend.store(flat, keyed=keyed, using=using)
            return [JobHandle(self, records) for records in per_call] if holders is None else \
                self._follow(per_call, holders)
        with self._sending(backend, flat):  # job_sent sees the holders' ids: followed inside
            holders = backend.store(flat, keyed=keyed, using=using)
            return [JobHandle(self, records) for records in per_call] if holders is None else \
                self._follow(per_call, holders)

    async def _aenqueue(self, job: Job, calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
                        due: float, keys: list[str | None] | None = None, after: Sequence[Any] | None = None,
                        on_failure: str | None = None, priority: int | None = None) -> list[JobHandle]:
        """``_enqueue`` for ``afire``: the store's async methods, never blocking the event loop."""
        backend = await self.aopen()
        if self._signing_stale(backend):
            stored = await backend.aget_setting(signature_policy.SETTING)
            self._signing_notice = (time.monotonic(), stored)
        live = (await backend._in_thread(housekeeping.live_workers, backend)
                if job.declared_on.queue_type == "broadcast" else None)
        per_call = self._records(backend, job, calls, due, keys, live, priority=priority)
        flat = [record for records in per_call for record in records]
        if after is not None or on_failure is not None:
            # The parents' existence is checked with one read, on the store's thread.
            await backend._in_thread(workflow.depend, self, backend, flat, after or [], on_failure)
        keyed = keys is not None and any(k is not None for k in keys)
        with self._sending(backend, flat):
            holders = await backend.astore(flat, keyed=keyed)
            return [JobHandle(self, records) for records in per_call] if holders is None else \
                self._follow(per_call, holders)

    def _records(self, backend: Persistence, job: Job, calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
                 due: float, keys: list[str | None] | None,
                 live: list[WorkerInfo] | None, routes: Sequence[str] | None = None,
                 priority: int | None = None) -> list[list[JobRecord]]:
        """The records of each call: one per route (a broadcast: one per live worker of the route).

        ``routes``: only these of the job's routes (a workflow step runs on one). ``priority``:
        this firing's (None: the job's declared one).
        """
        declared = job.declared_on  # a job rebound to this connection (Job.on) keeps its queue's options
        if keys is not None and any(k is not None for k in keys):
            _check_keys(declared, backend, keys)
        priority = job.priority if priority is None else flow.check_priority(priority)
        if priority:
            flow.require(backend, priority=True, what=f"{job.name} fired with priority={priority}")
        if job.limit is not None:
            flow.require(backend, limit=True, what=f"{job.name} is declared with {job.limit!r}")
        routes = job.routes if routes is None else routes
        targets: dict[str, list[str | None]] = {route: [None] for route in routes}
        if live is not None:
            targets = {route: [w.id for w in live if w.route == route] for route in routes}
        now = time.time()
        result_ttl = job.result_ttl if job.result_ttl is not None else float(declared.result_ttl)
        secret = signing.key_from_env()  # signing adds to the size; _seal signs
        if self._signing_notice is not None:  # refuse here what the workers would refuse
            problem = signature_policy.problem(self._signing_notice[1], secret, self.name)
            if problem is not None:
                raise ConfigurationError(problem)
        per_call: list[list[JobRecord]] = []
        for args, kwargs in calls:
            payload = serializer.dumps_call(args, kwargs, declared.serializer)
            _check_size(backend, job.name, len(payload) + (signing.overhead() if secret else 0))
            key = keys[len(per_call)] if keys is not None else None
            limits = job.limit.fields(job.name, args, kwargs) if job.limit is not None else {}
            per_call.append([
                JobRecord(id=new_id(), queue=self.name, route=route, func=job.name, payload=payload,
                          serializer=declared.serializer, due=due, created=now, target=target,
                          retries=job.retries, retry_backoff=job.retry_backoff, timeout=job.timeout,
                          # The retention travels with the record: no worker needs to know it.
                          result_ttl=result_ttl,
                          # One key per delivery; JSON keeps (route, key) pairs from colliding.
                          key=None if key is None else json.dumps([route, key]),
                          priority=priority, **limits)
                for route in routes for target in targets[route]
            ])
        return per_call

    @contextmanager
    def _sending(self, backend: Persistence, records: list[JobRecord]) -> Iterator[None]:
        """Around storing ``records``: the plugins' headers and the signature put on every record
        first, and the plugins told how the enqueue ended (``job_sent`` always follows ``job_sending``)."""
        observed = hooks.implemented("job_sending")
        try:
            self._seal(backend, records, observed)
            yield
        except BaseException as exc:
            if observed:
                hooks.call("job_sent", records=records, error=exc)
            raise
        if observed:
            hooks.call("job_sent", records=records, error=None)

    @staticmethod
    def _seal(backend: Persistence, records: list[JobRecord], observed: bool) -> None:
        """Put the plugins' headers (``job_sending``) into the records, then sign them."""
        secret = signing.key_from_env()  # SKUNQ_SECRET: sign every record (see skunkqueue.signing)
        if observed:
            extra: list[dict[str, str]] = [{} for _ in records]
            hooks.call("job_sending", records=records, headers=extra)
            for record, more in zip(records, extra):
                if more:
                    # Inside the payload: every backend keeps it, and the signature covers it.
                    record.payload = headers.wrap(more, record.payload)
                    _check_size(backend, record.func, len(record.payload) + (signing.overhead() if secret else 0))
        if secret:
            for record in records:
                signing.sign(secret, record)

    def _signing_stale(self, backend: Persistence) -> bool:
        """True when the workers' signing policy (signature_policy) is due to be read again."""
        if not backend.supports_settings:
            return False
        return self._signing_notice is None or time.monotonic() - self._signing_notice[0] > signature_policy.CHECK_EVERY

    def _follow(self, per_call: list[list[JobRecord]], holders: list[str]) -> list[JobHandle]:
        """Handles for keyed records: a key already held points the handle at the existing job."""
        held = iter(holders)
        for records in per_call:
            for record in records:
                record.id = next(held)
        return [JobHandle(self, records) for records in per_call]

    # -- inspecting -----------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        """The raw stored record (``skunkqueue.record.JobRecord``) or None: its ``payload`` and
        ``result`` are encoded bytes (a signed payload keeps its signature in front). To follow a
        job and read its decoded result, use :meth:`handle`."""
        return self.persistence.get(job_id)

    def handle(self, *job_ids: str) -> JobHandle:
        """The :class:`JobHandle` of a job fired earlier, from its id (e.g. sent to a client that
        polls): ``.state``, ``.result`` (decoded), ``.error``, ``.wait()``, ``await .aresult()``,
        as ``fire`` returned it. A firing on several routes has one id per route
        (``handle.ids``): pass them all to follow every delivery, as ``fire``'s handle does.

        Raises JobNotFound if a job does not exist on this queue (never fired, or expired or
        purged since). Results are decoded with this queue's serializer, never the one a
        stored record names.
        """
        return self._handle(job_ids, [self.persistence.get(job_id) for job_id in job_ids])

    async def ahandle(self, *job_ids: str) -> JobHandle:
        """:meth:`handle` for asyncio code: reads the store without blocking the event loop."""
        backend = await self.aopen()
        return self._handle(job_ids, [await backend.aget(job_id) for job_id in job_ids])

    def _handle(self, job_ids: Sequence[str], records: list[JobRecord | None]) -> JobHandle:
        if not job_ids:
            raise ConfigurationError("handle() needs a job id, e.g. queue.handle(job_id).")
        for job_id, record in zip(job_ids, records):
            if record is None:
                raise JobNotFound(f"No job {job_id!r} on queue {self.name} (never fired, or expired "
                                  "or purged since).")
        return JobHandle(self, [r for r in records if r is not None], serializer=self.serializer)

    def jobs(self, *, route: str | None = None, state: str | None = None, limit: int = 100) -> list[JobRecord]:
        """The queue's jobs (optionally of one route and/or state), ordered by due time."""
        if state is not None and state not in STATES:
            raise ConfigurationError(f"Unknown state {state!r}; use one of {', '.join(STATES)}.")
        return self.persistence.list_jobs(route=route, state=state, limit=limit)

    def workers(self) -> list[WorkerInfo]:
        """Registered workers (id, queue, route, host, pid, state, last heartbeat)."""
        return self.live_workers()

    def live_workers(self) -> list[WorkerInfo]:
        """Workers with a recent heartbeat; dead ones are reaped on the way."""
        return housekeeping.live_workers(self.persistence)

    def reap_workers(self, ttl: float = WORKER_TTL) -> list[str]:
        """Unregister workers that stopped sending heartbeats, and drop their broadcasts."""
        return housekeeping.reap_dead_workers(self.persistence, ttl)

    def counts(self) -> dict[tuple[str, str], int]:
        return self.persistence.counts()

    def dead_letters(self, limit: int = 1000) -> list[JobRecord]:
        return self.persistence.list_jobs(dead=True, limit=limit)

    # -- acting on jobs ---------------------------------------------------------

    def kill(self, job_or_id: Job | JobHandle | workflow.WorkflowHandle | str) -> str | None:
        """Kill a job: a pending one never runs; a running one is interrupted.

        A workflow's handle kills every member that has not finished, and returns the workflow's state.

        Takes an id, a handle, or a Job (its latest firing). Returns the
        resulting state (``killed``, or ``running`` while the worker is being
        told), or None if there is no such job.
        """
        if isinstance(job_or_id, workflow.WorkflowHandle):
            # Dependents first: a member killed before its parents is never released in between.
            for handle in reversed(job_or_id.jobs):
                self.kill(handle)
            return job_or_id.state
        if isinstance(job_or_id, Job):
            job_or_id = job_or_id.last if job_or_id.last else ""
        if isinstance(job_or_id, JobHandle):
            states = [self.kill(job_id) for job_id in job_or_id.ids]
            return states[0] if states else None
        backend = self.persistence
        for _ in range(10):  # the record may change state under us; try again
            record = backend.get(job_or_id)
            if record is None:
                return None
            if record.state in FINISHED_STATES:
                return record.state
            if record.state == PENDING:
                if backend.finish(record.id, record.token, policy.killed("killed before it ran"),
                                  expect=PENDING):
                    return "killed"
            elif record.state == RUNNING and backend.request_kill(record.id):
                return RUNNING
        return None

    def kill_all_by_route(self, route: str) -> int:
        """Kill every pending and running job of a route; returns how many."""
        backend = self.persistence
        records = backend.list_jobs(route=route, state=PENDING, limit=10**9)
        records += backend.list_jobs(route=route, state=RUNNING, limit=10**9)
        return sum(1 for r in records if self.kill(r.id) in ("killed", RUNNING))

    def purge(self, route: str) -> int:
        """Delete the route's pending jobs (running and finished ones stay)."""
        return self.persistence.purge(route)

    # -- flow control (skunkqueue.flow) ------------------------------------------------

    def limit(self, route: str, *, concurrency: int | None = None, rate: str | None = None,
              burst: int | None = None) -> None:
        """Limit a whole route, for every pool on every host: at most ``concurrency`` of its jobs
        running at once and ``rate`` (``"50/s"``) starting, with ``burst`` at once (default:
        what the rate allows in 10 ms, at least 1).

        Stored in the store; the claims obey it within a second. The arguments replace the route's
        limit; with neither ``concurrency`` nor ``rate`` the route has none any more.
        """
        check_name(route, "route")
        self._backend_class.check_names(self.name, [route])
        backend = self.persistence
        value = flow.make_route_limit(concurrency, rate, burst)
        flow.require(backend, limit=True, what=f"queue.limit on route {route!r}")
        backend.put_setting(flow.limit_setting(route), None if value is None else value.to_json())

    def pause(self, route: str) -> None:
        """Stop the claims of ``route`` (running jobs finish; new ones wait, pending) until :meth:`resume`."""
        check_name(route, "route")
        self._backend_class.check_names(self.name, [route])
        backend = self.persistence
        flow.require(backend, pause=True, what=f"queue.pause on route {route!r}")
        backend.put_setting(flow.pause_setting(route), "1")

    def resume(self, route: str) -> None:
        """Let the claims of a paused ``route`` go on (a route that is not paused stays as it is)."""
        check_name(route, "route")
        self._backend_class.check_names(self.name, [route])
        backend = self.persistence
        flow.require(backend, pause=True, what=f"queue.resume on route {route!r}")
        backend.put_setting(flow.pause_setting(route), None)

    def limits(self, routes: Sequence[str] | None = None) -> dict[str, flow.RouteFlow]:
        """Per route: paused, its limit and how many due jobs wait on a limit (``skunq limits``).

        Without ``routes``: every route that holds jobs or has a flow setting.
        """
        return flow.describe(self.persistence, routes)

    def retry(self, job_id: str, *, force: bool = False) -> bool:
        """Requeue a finished (e.g. dead-lettered) job with fresh attempts.

        A ``complete`` or ``killed`` job runs again only with ``force=True``:
        killed jobs are promised never to run again, and a complete one
        already ran. Returns False if there is no finished job with that id.
        """
        backend = self.persistence
        record = backend.get(job_id)
        if record is None or record.state not in FINISHED_STATES:
            return False
        if record.state in (COMPLETE, KILLED) and not force:
            raise ConfigurationError(
                f"Job {job_id} is {record.state}; retrying would run it again. "
                "Pass --force (force=True) if that is what you want."
            )
        return backend.finish(record.id, record.token, policy.requeue(record), expect=record.state)


def _check_keys(queue: QueueLike, backend: Persistence, keys: list[str | None]) -> None:
    if queue.queue_type == "broadcast":
        raise ConfigurationError("Idempotency keys need a direct queue: a broadcast's deliveries depend on "
                                 "which workers are alive when it is fired.")
    if not backend.supports_keys:
        raise ConfigurationError(f"The {backend.name} backend does not support idempotency keys (key=...) yet.")
    for key in keys:
        if key is not None and (not isinstance(key, str) or not key):
            raise ConfigurationError(f"An idempotency key must be a non-empty string, not {key!r}.")


def _check_size(backend: Persistence, function: str, size: int) -> None:
    if backend.max_payload is not None and size > backend.max_payload:
        raise PayloadTooLarge(
            f"The arguments of {function} encode to {size} bytes; the "
            f"{backend.name} backend stores at most {backend.max_payload}. "
            "Store large data elsewhere and pass a reference to it."
        )


def _check_serializer(name: str) -> str:
    name = serializer.check_name(name)
    if name == "pickle":
        log.warning("queue uses pickle: anyone who can write to the store can run code in its workers")
    return name
