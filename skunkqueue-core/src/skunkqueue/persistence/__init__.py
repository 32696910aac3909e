"""The Persistence protocol: what a storage backend must do.

A backend is a class that subclasses :class:`Persistence` and is registered
under the ``skunkqueue.backends`` entry point group. One instance serves one
queue. It is created as ``Backend(queue, url=..., db=..., **options)`` and is
used from one thread at a time (workers and producers each open their own).

The core decides *what* happens to a job (retry, dead-letter, kill); a backend
only stores records and applies state changes atomically. Every guarantee
below is checked by the conformance kit in :mod:`skunkqueue.testing`.

:class:`Persistence` composes the roles of :mod:`skunkqueue.persistence.roles`:
the job store (enqueue, claim, renew, finish, get, leases; ordering and fencing
are in :class:`~skunkqueue.persistence.roles.JobStore`), the worker registry,
the monitor's read side, and the optional ones (idempotency keys, the
application's transactions, workflows, settings, stats), plus the async
adapter. Each role's methods say what they guarantee. What spans roles is
here: the workflow and flow-control rules below, and the defaults that need
more than one role (:meth:`Persistence.store` and :meth:`Persistence.astore`,
:meth:`Persistence.flow_waiting`, the async adapter's thread).

Workflows (:mod:`skunkqueue.workflow`), for a backend that sets
``supports_workflows = True``; the rules are in :mod:`skunkqueue.dependencies`:

1. :meth:`enqueue` (and :meth:`enqueue_keyed`) stores a record with ``parents``
   as given (pending, ``due = WAITING_DUE``: never claimed) and, in the same
   atomic step, makes it a dependent of each parent; a parent that has already
   finished (or no longer exists: it counts as ``killed``) counts at once.
2. :meth:`finish`, when it ends a record (``complete``, ``error``,
   ``killed``), counts that record into each dependent's set of finished
   parents in the same atomic step (a set: a parent counts once however often
   its finish is replayed; a fenced-off finish changes nothing, so it does not
   count). A dependent whose set is complete is released: ``due`` set to now,
   its route's waiters woken; only a waiting record is released, so exactly
   once. A parent that did not complete ends the dependent ``killed`` with
   ``dependencies.dependency_failed`` at once, unless the dependent has
   ``on_failure == "run"``; that finish counts for the dependent's own
   dependents in turn.
3. :meth:`get_many` reads the parents of a released record (the worker passes
   their results on); the default calls :meth:`get` per id.

A store that cannot do 1 and 2 atomically must do them idempotently and let
housekeeping complete an interrupted release (see :meth:`release_stranded`).

Flow control (:mod:`skunkqueue.flow`): the rules are decided at fire time or
stored as settings, and the store enforces them in :meth:`claim`'s atomic
step, never by running user code. A backend declares what its claim does:

* ``supports_priorities``: claimable records are handed out by ``priority``
  descending, then ``due``, then ``id`` (FIFO among equal priorities).
* ``supports_pause``: while the setting ``flow.pause_setting(route)`` exists,
  a claim on that route takes nothing and changes nothing.
* ``supports_limits``: a record with a ``limit_key`` K is taken only if
  (a) ``limit_concurrency`` is None, or fewer than it of this queue's records
  with ``limit_key`` K are ``running`` with ``lease_until`` after the store's
  now (counting those this claim took already): a slot *is* a live lease, so
  :meth:`renew` keeps it, :meth:`finish` frees it, an expired lease frees it,
  and nothing else can leak or free one; and (b) ``limit_interval`` is None, or
  ``flow.gcra(tat, now, limit_interval, limit_burst)`` allows it, where
  ``tat`` is the store's value under ``flow.key_tat(K)``, set to the returned
  value in the same atomic step. The route's own limit
  (``flow.RouteLimit.from_json(get_setting(flow.limit_setting(route)))``)
  applies the same way to all the route's records: its concurrency counts the
  route's running records with a live lease, its rate is charged once per
  record taken under ``flow.route_tat(route)``. A record that a limit stops is
  skipped, not claimed: it stays ``pending`` with every field as it was (no
  attempt, no token), keeps its place, and the claim goes on with the records
  behind it (no head-of-line blocking), looking at no more than
  ``flow.FLOW_SCAN`` records in all; once the route's limit stops one, the
  claim ends. The claim may use route settings it read up to
  ``flow.SETTINGS_TTL`` seconds earlier (a change takes effect within it).
  :meth:`rate_times` reads the stored times, :meth:`flow_waiting` counts the
  records a limit or a pause holds back (the monitor shows it).
* Waking: a worker whose claim found only blocked records must not spin:
  :meth:`wait_for_work` of a store that notifies must not return at once again
  and again while the due records stay blocked. A finish that frees a slot, a
  stored time that passes and a flow setting that changes should wake waiters
  of the route; a store that cannot tell waits at most ``max_idle_poll``.

:mod:`skunkqueue.flow` refuses (one line, at fire, ``queue.limit``,
``queue.pause`` and pool start) a priority or limit that the backend does not
declare it enforces, rather than ignore it.
"""

from __future__ import annotations

import functools
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, ClassVar, Sequence, TypeVar

from skunkqueue import flow
from skunkqueue.errors import ConfigurationError
from skunkqueue.persistence.roles import (
    NOTIFY_LATENCY,
    AsyncAdapter,
    JobStore,
    KeyedEnqueue,
    MonitorView,
    Settings,
    Stats,
    TransactionalEnqueue,
    WorkerRegistry,
    Workflows,
    finish_poll_pause,
)
from skunkqueue.record import JobRecord, LeaseStatus, Outcome, WorkerInfo
from skunkqueue.urls import redact

T = TypeVar("T")

# Finished records are kept this long (seconds) unless the queue says otherwise.
DEFAULT_RESULT_TTL = 7 * 24 * 3600

# Seconds a producer's clock may differ from the clock of a store that has one
# (Persistence.now) before the store moves the times it computed (due) onto its
# own clock, keeping the delay meant; within it they are kept as written.
CLOCK_TOLERANCE = 0.5

# Statuses that :meth:`Persistence.renew` reports per job. Typed as plain strings, as
# renew's answer is: a backend's dict of them stays a dict[str, str].
LEASE_OK: str = LeaseStatus.OK      # lease extended
LEASE_LOST: str = LeaseStatus.LOST  # the record is no longer ours: stop, record nothing
LEASE_KILL: str = LeaseStatus.KILL  # still ours, but someone asked to kill it

#: Capabilities read from the class rather than declared: each is True exactly when the class
#: implements all of these methods. A backend used to set them by hand; a line that still does is
#: ignored (with a DeprecationWarning when it says otherwise than the class).
IMPLEMENTED_BY: dict[str, tuple[str, ...]] = {
    "supports_keys": ("enqueue_keyed",),
    "supports_settings": ("get_setting", "put_setting"),
    "keeps_stats": ("add_stats", "stats"),
}


def refuse_names_over(limit: int, store: str, queue: str, routes: Sequence[str] = ()) -> None:
    """ConfigurationError for a name that is not UTF-8 text or is over ``limit`` bytes in UTF-8.

    For :meth:`Persistence.check_names` of stores that keep names in size-limited keys or documents.
    """
    for kind, name in (("queue", queue), *(("route", route) for route in routes)):
        try:
            size = len(name.encode("utf-8"))
        except UnicodeEncodeError:
            raise ConfigurationError(f"The {kind} name {name!r} is not valid Unicode text (a lone surrogate?); "
                                     f"the {store} backend stores names as UTF-8.") from None
        if size > limit:
            raise ConfigurationError(f"The {kind} name is {size} bytes long in UTF-8; the {store} backend "
                                     f"takes names up to {limit} bytes.")


class Persistence(JobStore, WorkerRegistry, MonitorView, KeyedEnqueue, TransactionalEnqueue, Workflows,
                  Settings, Stats, AsyncAdapter):
    """Base class of every storage backend: the roles of :mod:`skunkqueue.persistence.roles`,
    composed. See the module docstring."""

    #: The entry point name, e.g. ``"redis"``.
    name: ClassVar[str] = ""
    #: The URL schemes this backend takes (``("redis", "rediss")``, lower case): an address
    #: given without a backend name (``SKUNQ_URL=redis://...``) chooses the backend whose
    #: :meth:`takes_url` says yes (see :mod:`skunkqueue.config`).
    url_schemes: ClassVar[tuple[str, ...]] = ()
    #: Read from the class (see :data:`IMPLEMENTED_BY`): the backend implements
    #: :meth:`enqueue_keyed`; :meth:`get_setting` and :meth:`put_setting`; :meth:`add_stats` and
    #: :meth:`stats`. A subclass does not set them.
    supports_keys: ClassVar[bool] = False
    supports_settings: ClassVar[bool] = False
    keeps_stats: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for flag, methods in IMPLEMENTED_BY.items():
            implemented = all(getattr(cls, m) is not getattr(Persistence, m) for m in methods)
            declared = cls.__dict__.get(flag, implemented)
            if bool(declared) != implemented:
                # A backend written before the roles set these by hand. Its line is ignored; say so
                # when ignoring it changes what the core and the kit do with the backend.
                warnings.warn(f"{cls.__module__}.{cls.__qualname__} sets {flag} = {declared!r}, but SkunkQueue "
                              f"reads it from whether the class implements {' and '.join(methods)}: it "
                              f"{'does' if implemented else 'does not'}, so {flag} is {implemented}. "
                              f"Remove the line.", DeprecationWarning, stacklevel=2)
            setattr(cls, flag, implemented)

    def __init__(self, queue: str, *, url: str | None = None, db: str | None = None,
                 result_ttl: float = DEFAULT_RESULT_TTL, **options: Any) -> None:
        self.queue = queue
        self.url = url
        self.db = db
        self.result_ttl = float(result_ttl)
        self.options = options

    @classmethod
    def takes_url(cls, url: str) -> bool:
        """True when ``url`` names a store of this backend: by default, its scheme is one of
        :attr:`url_schemes`. A backend that also takes scheme-less addresses (a file path)
        overrides this; it must not claim what another backend's scheme names."""
        scheme, sep, _ = url.partition("://")
        return bool(sep) and scheme.lower() in cls.url_schemes

    def describe(self) -> str:
        """The store this instance uses, for logs: backend, address (password ``***``), database."""
        return f"{self.name} {redact(self.url)}" + (f" db {self.db}" if self.db else "")

    @classmethod
    def check_names(cls, queue: str, routes: Sequence[str] = ()) -> None:
        """Refuse a queue or route name the store cannot hold, with ConfigurationError.

        Called by :func:`skunkqueue.backends.open_backend` before connecting,
        so a bad name fails when the queue is opened, not at the first write.
        The default accepts every name; a backend must round-trip every name
        it accepts exactly and keep different names apart.
        """

    def durability_warnings(self) -> list[str]:
        """Reasons why acknowledged writes might not survive a store restart.

        One line each, for workers to log at start; empty when the store keeps
        a durable copy (or cannot tell).
        """
        return []

    # -- what spans roles ----------------------------------------------------------

    def store(self, records: Sequence[JobRecord], *, keyed: bool, using: Any = None) -> list[str] | None:
        """Store records as ``fire`` does: in the caller's transaction (``using``, :meth:`enqueue_in`),
        by key (:meth:`enqueue_keyed`), or plainly (:meth:`enqueue`).

        Returns the holders' ids where keys or a transaction decide them (a key already held names
        the existing job), None when every record was stored under its own id.
        """
        if using is not None:
            return self.enqueue_in(using, records)
        if keyed:
            return self.enqueue_keyed(records)
        self.enqueue(records)
        return None

    async def astore(self, records: Sequence[JobRecord], *, keyed: bool) -> list[str] | None:
        """:meth:`store` for ``afire``, through the async adapter (:meth:`aenqueue_keyed` or
        :meth:`aenqueue`); an application's transaction is never async here."""
        if keyed:
            return await self.aenqueue_keyed(records)
        await self.aenqueue(records)
        return None

    def flow_waiting(self, route: str) -> int:
        """How many due, pending records of ``route`` a claim would skip now for a pause or a limit.

        Not on any hot path (``skunq limits``, the monitor). The default reads the route's
        pending and running records (at most ``flow.FLOW_SCAN`` of each) and :meth:`rate_times`.
        """
        return flow.count_waiting(self, route)

    # -- the async adapter's defaults: the sync method on a thread of this instance's own ------

    async def _in_thread(self, method: Callable[..., T], *args: Any) -> T:
        import asyncio  # here, not at the top: workers of sync jobs never pay for it

        executor = self.__dict__.get("_async_executor")
        if executor is None:
            executor = self.__dict__["_async_executor"] = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"skunkqueue-{self.name}")
        return await asyncio.get_running_loop().run_in_executor(executor, functools.partial(method, *args))

    async def aenqueue(self, records: Sequence[JobRecord]) -> None:
        """:meth:`enqueue`, awaitable."""
        await self._in_thread(self.enqueue, records)

    async def aenqueue_keyed(self, records: Sequence[JobRecord]) -> list[str]:
        """:meth:`enqueue_keyed`, awaitable."""
        return await self._in_thread(self.enqueue_keyed, records)

    async def aget(self, job_id: str) -> JobRecord | None:
        """:meth:`get`, awaitable."""
        return await self._in_thread(self.get, job_id)

    async def aget_setting(self, name: str) -> str | None:
        """:meth:`get_setting`, awaitable (``afire`` reads the workers' signing policy with it)."""
        return await self._in_thread(self.get_setting, name)

    async def await_finished(self, job_id: str, timeout: float | None) -> JobRecord | None:
        """:meth:`wait_finished` for asyncio code (``aresult``): the same looks, never blocking the loop.

        Looks with :meth:`aget` and, between looks, waits in :meth:`_await_finish`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        rounds = 0
        while True:
            record = await self.aget(job_id)
            if record is None or record.finished_state:
                return record
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return record
            await self._await_finish(job_id, left, rounds)
            rounds += 1

    async def _await_finish(self, job_id: str, left: float | None, rounds: int) -> None:
        """:meth:`_wait_for_finish` for :meth:`await_finished`; the default sleeps the same back-off."""
        import asyncio  # as in _in_thread: only async callers load it

        await asyncio.sleep(finish_poll_pause(rounds, left))

    async def aworkers(self) -> list[WorkerInfo]:
        """:meth:`workers`, awaitable."""
        return await self._in_thread(self.workers)

    def close(self) -> None:
        """Release connections. The instance is not used afterwards."""

    def __enter__(self) -> Persistence:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "CLOCK_TOLERANCE",
    "DEFAULT_RESULT_TTL",
    "IMPLEMENTED_BY",
    "LEASE_KILL",
    "LEASE_LOST",
    "LEASE_OK",
    "NOTIFY_LATENCY",
    "AsyncAdapter",
    "JobRecord",
    "JobStore",
    "KeyedEnqueue",
    "LeaseStatus",
    "MonitorView",
    "Outcome",
    "Persistence",
    "Settings",
    "Stats",
    "TransactionalEnqueue",
    "WorkerInfo",
    "WorkerRegistry",
    "Workflows",
    "finish_poll_pause",
    "refuse_names_over",
]
