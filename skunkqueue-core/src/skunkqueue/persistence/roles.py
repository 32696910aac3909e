"""The roles a storage backend plays, each a protocol with the guarantees of its methods.

:class:`~skunkqueue.persistence.Persistence` composes them; a backend subclasses it and
implements the methods of the roles it plays. Code that needs only some roles names just those
as its parameter's type (housekeeping takes a :class:`JobStore` to recover leases, and a
:class:`JobStore` that is a :class:`WorkerRegistry` to reap workers), and a fake for a test then
needs only their methods.

Every backend plays :class:`JobStore` (enqueue, get, claim, renew, finish,
expired_leases, request_kill, purge), :class:`WorkerRegistry` (register_worker,
heartbeat, unregister_worker, workers) and :class:`MonitorView` (list_jobs,
counts): those fourteen methods are abstract, the rest of these roles have
defaults. The optional roles are :class:`KeyedEnqueue`, :class:`TransactionalEnqueue`,
:class:`Workflows`, :class:`Settings` and :class:`Stats`; :class:`AsyncAdapter` has
defaults that run the sync methods on a thread. docs/writing-a-backend.md has the
table of roles with the parts of the conformance kit that prove each.

An optional role that consists of methods is declared by implementing them: ``supports_keys``,
``supports_settings`` and ``keeps_stats`` are read from the class (see
:data:`skunkqueue.persistence.IMPLEMENTED_BY`), never set by hand. A role that changes what
another role's method does (workflows change ``finish``, flow control changes ``claim``, newest
pages change ``list_page``) cannot be seen in the class, so it stays a flag the backend sets.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from typing import Any, ClassVar, Protocol, Sequence

from skunkqueue.errors import ConfigurationError
from skunkqueue.metrics import RouteMinute
from skunkqueue.record import JobRecord, Outcome, WorkerInfo
from skunkqueue.summary import QueueSummary, summarize

# How soon, in seconds, a backend that ``notifies`` must wake a waiting worker
# after new work is stored (the kit checks it, with some slack for a busy machine).
NOTIFY_LATENCY = 0.03


def lacking(backend: str, what: str) -> NotImplementedError:
    """The error of an optional role's default. Raised as ``raise lacking(...)``, not as
    ``raise NotImplementedError(...)``: mypy takes a method whose body is only the latter for
    abstract, and would refuse to instantiate a backend that leaves the optional role out."""
    return NotImplementedError(f"the {backend} backend {what}")


def finish_poll_pause(rounds: int, left: float | None) -> float:
    """The pause between two looks at an unfinished record: 1 ms doubling to 100 ms, never past ``left``."""
    pause = min(0.001 * 2 ** min(rounds, 7), 0.1)
    return pause if left is None else min(pause, left)


class JobStore(Protocol):
    """Records in, claims with leases out, outcomes fenced by tokens. Every backend plays it.

    Ordering: within a route, claimable records are handed out by ascending
    ``due``, ties broken by enqueue order (ascending ``id``, which sorts by
    creation time, or the store's commit order where it has one).

    Leases and fencing: :meth:`claim` sets ``owner``, ``lease_until`` and bumps
    ``token``. The worker renews the lease while the job runs. When the lease runs
    out the core finds the record with :meth:`expired_leases` and puts it back with
    :meth:`finish`. Because :meth:`finish` only applies when the caller's token is
    still the record's token and the record is in the expected state, a worker
    that lost its lease can never overwrite the outcome recorded by the worker
    that took over.

    Flow control (:mod:`skunkqueue.flow`) changes what :meth:`claim` does, so a
    backend declares it with the flags ``supports_priorities``, ``supports_limits``
    and ``supports_pause``; the rules are in the :mod:`skunkqueue.persistence`
    module docstring.
    """

    #: The entry point name, e.g. ``"redis"``.
    name: ClassVar[str]
    #: The queue this instance serves.
    queue: str
    #: How long a finished record is kept, in seconds, unless the record says otherwise.
    result_ttl: float
    #: Largest encoded payload the backend accepts, in bytes (None: no limit).
    max_payload: ClassVar[int | None] = None
    #: True when :meth:`wait_for_work` wakes within ``NOTIFY_LATENCY`` of new work arriving;
    #: False when it polls, so that new work waits up to ``max_idle_poll``. Read by the
    #: conformance kit. A backend may set it per instance (e.g. change streams only on a replica set).
    notifies: bool = False
    #: True when :meth:`wait_and_claim` sends the claim with the wait (one round trip): workers use it.
    claims_on_wake: ClassVar[bool] = False
    #: Set (by the worker's signal handler: a flag) once the worker using this store is stopping:
    #: a :meth:`wait_for_work` that polls returns at its next look instead of at its timeout.
    stop_waiting: bool = False
    #: Longest sleep of the default :meth:`wait_for_work`'s back-off, in seconds.
    max_idle_poll: ClassVar[float] = 0.2
    #: Flow control: True when :meth:`claim` hands out records by ``priority``; when it enforces
    #: records' ``limit_*`` fields and routes' stored limits; and when it takes nothing from a
    #: paused route. ``fire``, ``queue.limit``/``pause`` and pools refuse what is not declared.
    supports_priorities: ClassVar[bool] = False
    supports_limits: ClassVar[bool] = False
    supports_pause: ClassVar[bool] = False

    # -- producers ------------------------------------------------------------

    @abstractmethod
    def enqueue(self, records: Sequence[JobRecord]) -> None:
        """Store new records (state ``pending``).

        Each record becomes claimable atomically once it is due; a worker
        blocked in :meth:`wait_for_work` on its route wakes up. If the call
        raises, the caller must assume that some records may have been stored
        (stores with multi-record atomicity store all or none); if it returns,
        all were stored durably as far as the store's settings allow.

        A record whose id is already stored is left as it is: whatever its state, owner, token,
        attempts and result, and without an error; the other records of the call are stored.
        Ids are new per fire, so such a record is the same one sent again after a reply was
        lost (the first send applied), and a worker may have claimed it meanwhile: storing it
        again would make it pending, and it would run twice at once. The same holds for
        :meth:`KeyedEnqueue.enqueue_keyed`, which returns the record's own id for it.
        """

    @abstractmethod
    def get(self, job_id: str) -> JobRecord | None:
        """The record with this id, or None if it never existed or expired.

        A record that exists but cannot be decoded raises MalformedRecord.
        """

    def get_many(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        """:meth:`get` for each id, in order (a workflow step reads its parents with it).

        A store that can read many records in one round trip should override it.
        """
        return [self.get(job_id) for job_id in job_ids]

    @abstractmethod
    def purge(self, route: str, *, target: str | None = None) -> int:
        """Delete the route's ``pending`` records and return how many.

        With ``target``, delete only the broadcast records meant for that
        worker. Running and finished records are untouched.
        """

    @abstractmethod
    def request_kill(self, job_id: str) -> bool:
        """Flag a ``running`` record so its worker interrupts it.

        Returns False if the record is not running. The flag is reported to
        the lease holder by :meth:`renew` as ``LEASE_KILL``, and it
        survives until the record finishes (see :meth:`finish`).
        """

    # -- workers ----------------------------------------------------------------

    @abstractmethod
    def claim(self, route: str, worker_id: str, lease: float, limit: int = 1) -> list[JobRecord]:
        """Atomically take up to ``limit`` due records of ``route``.

        Considers pending records with ``due <= now`` whose ``target`` is None
        or ``worker_id``, in (due, id) order. Each claimed record is returned
        with ``state="running"``, ``owner=worker_id``,
        ``lease_until=now+lease``, ``token`` incremented by one, ``attempts``
        incremented by one and ``started`` set. Exactly one concurrent caller
        gets any given record. A record that cannot be decoded is not
        returned: it is marked ``error`` (``dead``) with a message naming the
        damage, so it neither blocks the route nor crashes the worker.
        """

    @abstractmethod
    def renew(self, worker_id: str, leases: Sequence[tuple[str, int]],
              lease: float) -> dict[str, str]:
        """Extend the leases ``(job_id, token)`` held by ``worker_id``.

        For each job: ``LEASE_OK`` (extended to now+lease),
        ``LEASE_KILL`` (extended, and a kill was requested) or
        ``LEASE_LOST`` (the record is not running under this token; the
        worker must stop and record nothing).
        """

    @abstractmethod
    def finish(self, job_id: str, token: int, outcome: Outcome, *,
               expect: str = "running") -> bool:
        """Apply ``outcome`` in one atomic step, if the record is still ours.

        Applies only if the record's ``state == expect`` and its ``token ==
        token``; otherwise changes nothing and returns False. On success the
        lease is cleared; a ``pending`` outcome makes the record claimable
        again at ``outcome.due``; a finished outcome stores result or error,
        removes the record from its route's claimable set and schedules its
        deletion after ``result_ttl`` seconds. Waiters in
        :meth:`wait_finished` are woken.

        A kill request outranks any way back to the queue: a ``pending``
        outcome applied to a record whose ``kill_requested`` is set ends it
        ``killed`` instead, with the error ``record.KILLED_BY_REQUEST``
        (exactly what :meth:`Outcome.apply_to` does), so a killed job never
        runs again after a retry, a hand-back or a lost lease.

        History: when ``outcome.attempt`` is set (the entry of the attempt this
        finish ends, built by the core with ``record.attempt_entry``), the same
        atomic step appends it to the record's ``history`` with ``"finished"``
        set to the store's now, keeps the last ``record.HISTORY_LIMIT`` entries
        and adds the number it dropped to ``history_dropped``. A finish that
        does not apply appends nothing, so a stale or replayed finish cannot
        add an entry.
        """

    def finish_and_claim(self, job_id: str, token: int, outcome: Outcome, route: str, worker_id: str,
                         lease: float, limit: int = 1) -> tuple[bool, list[JobRecord]]:
        """:meth:`finish` a running record, then :meth:`claim` the next ones.

        Each half keeps its own guarantees; the two need not be atomic
        together. Workers call this after every job, so a backend that can do
        both in one round trip (one script, one transaction) should override
        it; the default simply makes the two calls.
        """
        done = self.finish(job_id, token, outcome)
        return done, self.claim(route, worker_id, lease, limit)

    @abstractmethod
    def expired_leases(self, now: float, limit: int = 100) -> list[JobRecord]:
        """Running records whose ``lease_until`` is before ``now``.

        A store with its own clock (:meth:`now`) compares with that instead and
        ignores ``now``, so a host whose clock runs fast cannot take over leases
        that are being renewed.

        The core hands them back out with :meth:`finish` (guarded by their
        token), so a concurrent renewal or a second recoverer is harmless.
        """

    def now(self) -> float:
        """The store's clock (epoch seconds); the default is this host's.

        Stores with a clock compare due times and leases with it, whatever
        ``now`` a caller passes; housekeeping that compares a stored time
        (e.g. a heartbeat's ``last_seen``) should use this one too.
        """
        return time.time()

    # -- expiry ------------------------------------------------------------------

    def ttl_of(self, record: JobRecord) -> float:
        """How long a finished record is kept: its own ``result_ttl``, else this backend's default."""
        return record.result_ttl if record.result_ttl is not None else self.result_ttl

    def delete_expired(self, now: float, limit: int = 1000) -> int:
        """Delete up to ``limit`` finished records whose time to live (see :meth:`ttl_of`,
        counted from ``finished``) ended before ``now``; return how many.

        Housekeeping calls it about once a second. The default does nothing,
        for stores that expire records by themselves (Redis key expiry); a
        store that only sweeps now and then must still answer :meth:`get`
        with None for a record past its time.
        """
        return 0

    def delete_finished(self, job_ids: Sequence[str]) -> int:
        """Delete the given records that are finished (complete, error, killed) now; return how many.

        Pending and running records are left alone (a worker may hold them).
        The monitor deletes dead letters with it. The default needs no new
        store operation: it rewrites each record's outcome, guarded by its
        token, as finished long enough ago that its time to live is over, and
        runs :meth:`delete_expired`; a store that expires records by itself
        (Redis, a Mongo TTL index) should override it.
        """
        now = time.time()
        deleted = 0
        for job_id in job_ids:
            record = self.get(job_id)
            if record is None or not record.finished_state:
                continue
            past = now - self.ttl_of(record) - 1
            outcome = Outcome(record.state, result=record.result, error=record.error, dead=False, finished=past)
            if self.finish(record.id, record.token, outcome, expect=record.state):
                deleted += 1
        self.delete_expired(now, limit=max(1000, len(job_ids)))
        return deleted

    # -- waiting (override where the store can notify) --------------------------

    def wait_for_work(self, route: str, worker_id: str, timeout: float, idle: float = 0.0) -> None:
        """Block up to ``timeout`` seconds, returning early if work may be ready on ``route``.

        Workers call it whenever a claim found nothing, with ``idle`` the
        seconds since they last got work. Spurious early returns are allowed,
        but a backend must not return at once again and again while nothing
        is due (the worker would spin).

        The default is the polling back-off: it sleeps about as long as the
        worker has been idle, from 1 ms up to ``max_idle_poll``, so that a
        busy queue is polled briskly and an idle one rarely. Backends that
        can block on the store override it (and set ``notifies``).
        """
        time.sleep(max(0.0, min(timeout, self.max_idle_poll, max(idle, 0.001))))

    def wait_and_claim(self, route: str, worker_id: str, timeout: float, idle: float, lease: float,
                       limit: int = 1) -> list[JobRecord]:
        """:meth:`wait_for_work`, then :meth:`claim`: what a worker whose claim found nothing does next.

        Workers call it only where the backend sets ``claims_on_wake`` (and
        nothing in between would stop them claiming): a store that can send
        the claim with its wait, to run the moment the wait returns, saves a
        round trip on every idle job's path. The default makes the two calls.
        """
        self.wait_for_work(route, worker_id, timeout, idle)
        return self.claim(route, worker_id, lease, limit)

    def wake_worker(self, route: str, worker_id: str) -> None:
        """Cut short the wait for work of worker ``worker_id`` on ``route``, now or at its next wait.

        Its pool calls it after telling the worker to stop: a worker notices the
        stop only when its wait returns, and a wait that blocks in the store (a
        Redis BLPOP) is not cut short by the signal. Spurious wake-ups are allowed
        (the worker looks, then waits again). The default does nothing: the
        polling waits are short, and backends whose wait the signal does cut
        short need nothing either.
        """
        return None  # a body, so that type checkers do not take the default for an abstract method

    def wait_finished(self, job_id: str, timeout: float | None) -> JobRecord | None:
        """Block until the record is finished or ``timeout`` passes; return it.

        Looks with :meth:`get`, then after each wait in :meth:`_wait_for_finish` with
        :meth:`_look_again` (a store that can be woken overrides only the wait, or
        :meth:`_wait_then_get` to wait and look again in one round trip).
        Returns the last record seen (possibly unfinished) or None if missing.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        rounds = 0
        record = self.get(job_id)
        while True:
            if record is None or record.finished_state:
                return record
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return record
            record = self._wait_then_get(job_id, left, rounds, record)
            rounds += 1

    def _look_again(self, job_id: str, last: JobRecord) -> JobRecord | None:
        """The record as it is now, for :meth:`wait_finished`; ``last``: the previous look (unfinished).

        The default reads it whole. A store that can read one field may read the state alone and
        return ``last`` while the state is unchanged: a workflow callback's record names every
        parent (a 10,000-member group's: 10,000 ids, ~400 kB), and a waiter looks every 100 ms.
        """
        return self.get(job_id)

    def _wait_then_get(self, job_id: str, left: float | None, rounds: int, last: JobRecord) -> JobRecord | None:
        """:meth:`_wait_for_finish`, then :meth:`_look_again` (``last``: the previous look)."""
        self._wait_for_finish(job_id, left, rounds)
        return self._look_again(job_id, last)

    def _wait_for_finish(self, job_id: str, left: float | None, rounds: int) -> None:
        """Pause between two looks at an unfinished record; ``left``: seconds until the caller's deadline.

        The default polls with a back-off from 1 ms to 100 ms (``rounds``: the
        pauses so far). It may return early: the record is looked at again.
        """
        time.sleep(finish_poll_pause(rounds, left))


class KeyedEnqueue(Protocol):
    """Idempotency keys (``fire(key=...)``, and periodic jobs). Optional: a class that
    implements :meth:`enqueue_keyed` has ``supports_keys``."""

    name: ClassVar[str]

    def enqueue_keyed(self, records: Sequence[JobRecord]) -> list[str]:
        """Store each record unless this queue already holds a record with its ``key``.

        Returns, for each record given, the id of the record that holds its
        key: its own id if it was stored, else the existing record's. The
        check and the insert are one atomic step per key: of any number of
        concurrent callers (in any process) with the same key, exactly one
        stores its record and the others get that record's id. A record holds
        its key while it exists - pending, running, or finished and not yet
        expired; once it has expired or was purged, the key is free again.
        Records without a key are stored as :meth:`JobStore.enqueue` stores them.
        """
        raise lacking(self.name, "does not support idempotency keys")


class TransactionalEnqueue(Protocol):
    """Jobs stored in the application's own open transaction (``fire(..., using=handle)``).
    Optional, declared with ``supports_using``."""

    name: ClassVar[str]

    #: True when the backend implements :meth:`enqueue_in`.
    supports_using: ClassVar[bool] = False
    #: True when the application's open transaction (``using=``) holds the store's only write lock,
    #: so that workers and other producers wait for its end (SQLite: one writer per file).
    using_blocks_writers: ClassVar[bool] = False

    def enqueue_in(self, handle: Any, records: Sequence[JobRecord]) -> list[str]:
        """Store the records as :meth:`KeyedEnqueue.enqueue_keyed` does, inside the caller's open
        transaction on ``handle``.

        ``handle`` is the store's native transactional handle, the application's
        own (e.g. a psycopg connection). The records exist exactly if that
        transaction commits: none after a rollback, and no worker sees them
        before the commit; the workers' wake-up is sent on commit. Returns
        what :meth:`KeyedEnqueue.enqueue_keyed` returns. A handle the backend cannot use
        (another library's, another store's, another database's) is one
        ConfigurationError, and nothing is stored.
        """
        raise ConfigurationError(f"The {self.name} backend cannot store jobs in a transaction of "
                                 f"yours (using=); fire after your transaction commits instead.")

    def get_many_in(self, handle: Any, job_ids: Sequence[str]) -> list[JobRecord | None]:
        """:meth:`JobStore.get_many` as the caller's open transaction on ``handle`` sees the records,
        those stored in it and not committed yet included (``fire(..., after=[h], using=handle)``
        checks that the parents exist through it). The default reads outside the transaction.
        """
        return self.get_many(job_ids)  # type: ignore[attr-defined]


class Workflows(Protocol):
    """Dependents counted down with the finish (``chain``, ``group``, ``fire(after=...)``).

    Optional, declared with ``supports_workflows``: it changes what
    :meth:`JobStore.enqueue` and :meth:`JobStore.finish` do (the rules are in the
    :mod:`skunkqueue.persistence` module docstring), which the class cannot show.
    """

    #: True when the backend counts dependents down; ``fire`` refuses workflows otherwise.
    supports_workflows: ClassVar[bool] = False

    def dependents(self, job_id: str) -> list[str]:
        """The ids of the records that wait (or waited) for this one; the default knows none."""
        return []

    def release_stranded(self, limit: int = 100) -> int:
        """Complete releases that a crash interrupted, for stores that cannot count down in the
        finish's atomic step; housekeeping calls it. Returns how many dependents it settled.
        The default does nothing: a store that counts atomically never strands one."""
        return 0


class WorkerRegistry(Protocol):
    """Which workers are alive: pools register their workers, heartbeat them, and reap the dead.
    Every backend plays it."""

    @abstractmethod
    def register_worker(self, info: WorkerInfo) -> None:
        """Add or replace a worker in the registry."""

    @abstractmethod
    def heartbeat(self, worker_id: str, state: str) -> bool:
        """Record that the worker is alive and what it is doing.

        Returns False if the worker is not registered (it was reaped); the
        worker then registers again.
        """

    @abstractmethod
    def unregister_worker(self, worker_id: str) -> None:
        """Remove a worker from the registry (idempotent)."""

    @abstractmethod
    def workers(self) -> list[WorkerInfo]:
        """Every registered worker of this queue, live or not yet reaped."""

    def clock_offsets(self) -> list[float]:
        """How far peers' clocks are from this host's: one value per live peer, in seconds.

        For stores without a clock of their own, whose leases and due times are
        therefore stamped with hosts' clocks (FoundationDB): each value is a
        peer's clock minus this host's, measured against the store's own notion
        of time (e.g. its versions) from the peers' recent heartbeats. A pool
        refuses to start when one exceeds what its lease tolerates. The default,
        for stores that decide times by their own clock or one host, is empty.
        """
        return []


class Settings(Protocol):
    """A little state of the core's own: periodic schedules, route limits and pauses, the signing
    policy. Optional: a class that implements both methods has ``supports_settings``."""

    name: ClassVar[str]

    def get_setting(self, name: str) -> str | None:
        """The value last put under ``name`` for this queue, or None."""
        raise lacking(self.name, "keeps no settings")

    def put_setting(self, name: str, value: str | None) -> None:
        """Set (or with None, delete) a setting of this queue; last writer wins."""
        raise lacking(self.name, "keeps no settings")


class Stats(Protocol):
    """Throughput counters per route and minute (:mod:`skunkqueue.metrics`), for the monitor's
    charts and metrics. Optional: a class that implements both methods has ``keeps_stats``."""

    def add_stats(self, samples: Sequence[RouteMinute]) -> None:
        """Add each sample's counters to the stored counters of its (route, minute).

        Addition is atomic per counter, so pools on many hosts can add at
        once. Counters older than ``metrics.RETENTION`` seconds may be
        dropped. Called by each pool once per heartbeat, never per job. The
        default keeps nothing.
        """
        return None

    def stats(self, since_minute: int) -> list[RouteMinute]:
        """The stored counters of every minute ``>= since_minute``, one entry per (route, minute)."""
        return []


class MonitorView(Protocol):
    """What ``skunq status`` and the monitor read: counts, listings, pages, flow. Read only, and on
    no hot path. Every backend plays it (``list_jobs`` and ``counts``; the rest have defaults)."""

    name: ClassVar[str]

    #: True when :meth:`list_page` takes ``newest=True`` (the monitor's "newest first").
    pages_newest_first: ClassVar[bool] = False

    @abstractmethod
    def list_jobs(self, *, route: str | None = None, state: str | None = None,
                  dead: bool | None = None, limit: int = 1000) -> list[JobRecord]:
        """Records matching every given filter, ordered by ``due`` then ``id``.

        Records that cannot be decoded are skipped. Not on any hot path.
        """

    @abstractmethod
    def counts(self) -> dict[tuple[str, str], int]:
        """Number of records per ``(route, state)`` in this queue."""

    def summary(self, now: float | None = None) -> QueueSummary:
        """Per route: records per state, dead letters, and the ``due`` of the longest-waiting due record.

        ``skunq web`` reads it once per refresh. The default makes one
        :meth:`counts`, one dead-letter :meth:`list_jobs` and one
        :meth:`list_jobs` per route with pending records; override it where
        the store can answer from its indexes.
        """
        return summarize(self, now)

    def list_page(self, *, route: str | None = None, state: str | None = None, dead: bool | None = None,
                  limit: int = 100, after: str | None = None,
                  newest: bool = False) -> tuple[list[JobRecord], str | None]:
        """Up to ``limit`` records matching the filters (as :meth:`list_jobs`), and the cursor of the next page.

        ``after`` is a cursor this method returned (None: the first page); the
        returned cursor is None when no records follow. The order is the
        store's own, stable while paging; the default is :meth:`list_jobs`'s
        (due, id) order with the offset as cursor, so it reads every earlier
        page again: a store with indexes should override it. A cursor this
        store did not make raises ValueError (also one made for the other
        ``newest``).

        With ``newest``, the order is descending ``id``: the newest fired first
        (ids sort by creation time). A store that can set ``pages_newest_first``;
        a page may then come back short, with a cursor, as with the store's order.
        """
        if newest:
            raise NotImplementedError(f"the {self.name} backend lists in its own order only")
        offset = 0
        if after:
            if not after.isdigit():
                raise ValueError(f"{after!r} is not a page cursor of this store")
            offset = int(after)
        found = self.list_jobs(route=route, state=state, dead=dead, limit=offset + limit + 1)
        more = len(found) > offset + limit
        return found[offset:offset + limit], str(offset + limit) if more else None

    def rate_times(self, names: Sequence[str]) -> dict[str, float]:
        """The stored GCRA times (``flow.key_tat``/``flow.route_tat`` names) that are still ahead
        of the store's now; names without one are left out. The monitor reads it; the default,
        for a store without rates, knows none."""
        return {}

    def flow_waiting(self, route: str) -> int:
        """How many due, pending records of ``route`` a claim would skip now for a pause or a limit.

        Not on any hot path (``skunq limits``, the monitor). The default (in
        :class:`~skunkqueue.persistence.Persistence`, since it also reads settings and the
        store's clock) reads the route's pending and running records (at most
        ``flow.FLOW_SCAN`` of each) and :meth:`rate_times`.
        """
        raise NotImplementedError


class AsyncAdapter(Protocol):
    """The producer's side for asyncio code: ``afire``/``afire_at``/``afire_many`` call
    :meth:`aenqueue` or :meth:`aenqueue_keyed` (and :meth:`aworkers` on a broadcast queue);
    ``aresult`` awaits :meth:`await_finished`.

    SkunkQueue gives async callers an instance of their own (``SkunkQueue.apersistence``), used
    from any number of event loops, in any threads, one after the other or at once. The defaults
    (in :class:`~skunkqueue.persistence.Persistence`, since they wrap the other roles) run the
    synchronous method on one thread of the instance's own, so calls stay one at a time and the
    event loop never blocks. A backend whose store has an asyncio client overrides them (Redis:
    ``skunkqueue_redis/aio.py``, MongoDB: ``skunkqueue_mongo/aio.py``) and then must: keep one
    client per event loop (asyncio clients belong to the loop they first ran on; make them
    lazily, on the loop's first call); connect exactly as the sync client does (address, TLS,
    credentials, timeouts, retries); give the same results and raise the same errors as the sync
    method (BackendUnavailable, ConfigurationError, MalformedRecord, PayloadTooLarge, without
    secrets); and in ``close`` let clients of loops still running close on their loop. An
    override may fall back to the default (``await super().aenqueue(...)``) for a case its client
    cannot do. The kit's AsyncSuite runs the producer tests through both APIs, checks that a
    ticker on the loop keeps its 10 ms rhythm during 1,000 ``afire`` calls and, for a backend
    that overrides, that no thread served them.
    """

    async def aenqueue(self, records: Sequence[JobRecord]) -> None:
        """:meth:`JobStore.enqueue`, awaitable."""
        raise NotImplementedError

    async def aenqueue_keyed(self, records: Sequence[JobRecord]) -> list[str]:
        """:meth:`KeyedEnqueue.enqueue_keyed`, awaitable."""
        raise NotImplementedError

    async def aget(self, job_id: str) -> JobRecord | None:
        """:meth:`JobStore.get`, awaitable."""
        raise NotImplementedError

    async def aget_setting(self, name: str) -> str | None:
        """:meth:`Settings.get_setting`, awaitable (``afire`` reads the workers' signing policy with it)."""
        raise NotImplementedError

    async def await_finished(self, job_id: str, timeout: float | None) -> JobRecord | None:
        """:meth:`JobStore.wait_finished` for asyncio code (``aresult``): the same looks, never
        blocking the loop."""
        raise NotImplementedError

    async def aworkers(self) -> list[WorkerInfo]:
        """:meth:`WorkerRegistry.workers`, awaitable."""
        raise NotImplementedError


#: Every role, in the order of the table above (the kit maps its parts to these).
ROLES: tuple[type, ...] = (JobStore, WorkerRegistry, MonitorView, KeyedEnqueue, TransactionalEnqueue,
                           Workflows, Settings, Stats, AsyncAdapter)

__all__ = [
    "NOTIFY_LATENCY",
    "ROLES",
    "AsyncAdapter",
    "JobStore",
    "KeyedEnqueue",
    "MonitorView",
    "Settings",
    "Stats",
    "TransactionalEnqueue",
    "WorkerRegistry",
    "Workflows",
    "finish_poll_pause",
]
