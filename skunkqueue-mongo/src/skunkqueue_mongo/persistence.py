"""The MongoDB backend: the Persistence protocol translated to MongoDB documents.

Database ``db`` (default ``skunkqueue``, or the one named in the URI) holds::

    jobs     one document per JobRecord: _id = record id, every other field as
             JobRecord.to_dict() gives it (payload/result are BSON binary), plus
             expire_at (a date) once the record is finished
    workers  one document per registered worker: _id = worker id
    settings one document per queue setting: _id = {q: queue, n: name}, value
    stats    throughput counters of one route and minute: _id = {q, r, m},
             queue, route, minute, counts {counter: int}, expire_at (TTL)
    flow     one document per rate (a limit key's or a route's): _id = {q, n},
             tat (GCRA's time), the last grant's nonce and the tat before it, granted
             (how many starts the last update granted),
             expire_at (TTL, a minute after the rate is idle again)

Every queue shares the ``jobs`` collection and is told apart by its ``queue``
field, the first field of every index. Queue names are arbitrary user strings
while collection names are not (no ``$``, a length limit); a shared collection
makes a new queue free, creates each index once per database rather than once
per queue, and lets one TTL index serve them all.

A claim is one ``find_one_and_update`` on the ``claim_priority`` index ordered
by (priority descending, due, _id); ids sort by creation time, so that is the
protocol's FIFO order among equal priorities, and the server's document-level
atomicity hands each record to one caller. A limited record's concurrency slot
is a field written by that same one-document update (see ``claim``).
Finishing is one ``find_one_and_update`` filtered on (_id, state, token): the fence.
On a replica set or sharded cluster (``transactions``) a record with dependents
is finished in one transaction with their count-down (see ``_finish_counting``).
Finished records carry ``expire_at`` and MongoDB's TTL monitor deletes them
(it runs once a minute, so reads also hide records already past it).

On a replica set or sharded cluster idle workers wait on a change stream
(``notifies`` is decided per instance from the server's ``hello``); a
standalone server has none, so :meth:`wait_for_work` polls one indexed query
with a back-off there.

The server's clock decides: claims, renewals, finishes, quarantines and
heartbeats are aggregation-pipeline updates that read ``$$NOW``, and the
claim and expired-lease queries compare with it in ``$expr``, so hosts' clocks
need not agree. (An index range bounded by an estimate of the server's clock,
kept from ``hello``'s ``localTime`` and this host's monotonic clock, keeps
those queries to a few index entries.) Times a client computes (a record's
``due``, a retry's ``due``) are kept as written while the client's clock is
within ``CLOCK_TOLERANCE`` of the server's; beyond that they are moved onto
the server's clock, keeping the delay the client meant.

Housekeeping (:meth:`expired_leases`) checks every ``INDEX_CHECK_EVERY``
seconds that the indexes still exist and re-creates them, so a dropped
database (or collection) regains its TTL and claim indexes under live workers.

Idempotency keys: a record with a ``key`` is covered by the unique partial
index ``key`` on (queue, key), so of concurrent inserts with one key the server
lets exactly one in. The others read the holder; one already past its
``expire_at`` (the TTL monitor has not got to it yet) is deleted, which frees
the key, and the insert is tried again.

Durability is the URI's write concern (replica sets default to majority).
Without a transaction, an enqueue of several records that fails part-way may
have stored some of them; it raises either way.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import Any, Callable, Generator, Mapping, Sequence, TypeVar

from bson.timestamp import Timestamp
from pymongo import ASCENDING, DESCENDING, IndexModel, MongoClient, ReturnDocument, UpdateOne
from pymongo.client_session import ClientSession
from pymongo.collection import Collection
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    ConnectionFailure,
    DocumentTooLarge,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)
from pymongo.errors import ConfigurationError as MongoConfigurationError
from pymongo.read_concern import ReadConcern

from skunkqueue import dependencies, flow, policy
from skunkqueue.errors import (
    BackendUnavailable,
    ConfigurationError,
    MalformedRecord,
    PayloadTooLarge,
    RecordHeld,
)
from skunkqueue.metrics import RETENTION, RouteMinute
from skunkqueue.persistence import LEASE_KILL, LEASE_LOST, LEASE_OK, Persistence, refuse_names_over
from skunkqueue.record import (
    ERROR,
    FINISHED_STATES,
    HISTORY_LIMIT,
    KILLED,
    PENDING,
    RUNNING,
    JobRecord,
    Outcome,
    WorkerInfo,
)
from skunkqueue.urls import redact, scrub
from skunkqueue_mongo.aio import NativeAsync
from skunkqueue_mongo.documents import KEY_ROUNDS
from skunkqueue_mongo.documents import date as _date
from skunkqueue_mongo.documents import docs as _docs
from skunkqueue_mongo.documents import holder_expired as _holder_expired
from skunkqueue_mongo.documents import not_expired as _not_expired
from skunkqueue_mongo.documents import on_id_index as _on_id_index
from skunkqueue_mongo.documents import refused_by_key as _refused_by_key
from skunkqueue_mongo.documents import shift_from as _shift_from
from skunkqueue_mongo.documents import to_record as _to_record

log = logging.getLogger("skunkqueue.mongodb")

DEFAULT_URL = "localhost:27017"
DEFAULT_DB = "skunkqueue"
# Fail in seconds, not pymongo's default 30 s, when the server is down. A URI
# that sets one of these (or appName) itself wins.
TIMEOUTS_MS = {"serverSelectionTimeoutMS": 5000, "connectTimeoutMS": 5000}
INDEX_NOT_FOUND = 27
# $inc or $add on a token that is not a number
TYPE_MISMATCH = {14, 16554}
ACCESS_DENIED = {13, 18}  # Unauthorized, AuthenticationFailed
# ShutdownInProgress, InterruptedAtShutdown, InterruptedDueToReplStateChange,
# NotWritablePrimary, NotPrimaryNoSecondaryOk, PrimarySteppedDown
TRANSIENT_CODES = {91, 11600, 11602, 10107, 13435, 189}
MAX_TIME_EXPIRED = 50
# How long (server time) a worker's or pool's write to a running record waits on a replica set for a
# transaction that holds it: one a SIGKILLed worker left open holds it until MongoDB aborts it
# (transactionLifetimeLimitSeconds, 60 s by default), and a pool waiting that long renews none of
# its other leases. Past it the finish raises RecordHeld, a BackendUnavailable (the worker tries again, and
# housekeeping after the lease) and the renewal skips that one record. A write that waits for nothing
# takes milliseconds.
LOCK_WAIT_MS = 1000
# How many ids of claimed records with dependents a store remembers (see _claimed): more are leases
# lost or handed back, whose finish never came here.
CLAIMED_PARENTS_KEPT = 10_000

# Index name -> (keys, options). Created once per process and database.
INDEXES: dict[str, tuple[list[tuple[str, int]], dict[str, Any]]] = {
    # Equality on queue/route/state/target, then (due, _id) in order: with
    # target $in [None, worker] the planner merges two ordered ranges, so a
    # claim reads the first matching entry instead of sorting.
    # (priority descending first: flow control's order; see claim.)
    "claim_priority": ([("queue", ASCENDING), ("route", ASCENDING), ("state", ASCENDING), ("target", ASCENDING),
                        ("priority", DESCENDING), ("due", ASCENDING), ("_id", ASCENDING)], {}),
    "lease": ([("queue", ASCENDING), ("state", ASCENDING), ("lease_until", ASCENDING)], {}),
    "expire": ([("expire_at", ASCENDING)], {"expireAfterSeconds": 0}),
    # One record per (queue, key); records without a key (key None) are not in it.
    "key": ([("queue", ASCENDING), ("key", ASCENDING)],
            {"unique": True, "partialFilterExpression": {"key": {"$type": "string"}}}),
    # Flow control: a running record of a limited key or route holds one numbered slot ("<key>#<n>",
    # n below the limit) while it runs; two claims for one slot cannot both write it.
    "flow_slot": ([("queue", ASCENDING), ("flow_slot", ASCENDING)],
                  {"unique": True, "partialFilterExpression": {"flow_slot": {"$type": "string"}}}),
    "route_slot": ([("queue", ASCENDING), ("route_slot", ASCENDING)],
                   {"unique": True, "partialFilterExpression": {"route_slot": {"$type": "string"}}}),
    # A key's running records, for counting its live leases.
    "limit_key": ([("queue", ASCENDING), ("limit_key", ASCENDING), ("state", ASCENDING), ("lease_until", ASCENDING)],
                  {"partialFilterExpression": {"limit_key": {"$type": "string"}}}),
    # Workflows: finished records whose dependents may not all have been counted yet.
    "settle": ([("queue", ASCENDING), ("settle_pending", ASCENDING)],
               {"partialFilterExpression": {"settle_pending": True}}),
}
# Workflows, one small document per edge and per count (see "workflows" in MongoPersistence):
# deps {_id: "parent/child"}, settled {_id: "child/parent"}, waits {_id: child}; each expires.
DEPS_INDEXES: dict[str, tuple[list[tuple[str, int]], dict[str, Any]]] = {
    "deps_parent": ([("parent", ASCENDING)], {}),
    "deps_expire": ([("expire_at", ASCENDING)], {"expireAfterSeconds": 0}),
}
# Flow control's GCRA times: {_id: {q, n}, tat, grant, prev, granted, expire_at} (see _grant).
FLOW_INDEXES: dict[str, tuple[list[tuple[str, int]], dict[str, Any]]] = {
    "flow_expire": ([("expire_at", ASCENDING)], {"expireAfterSeconds": 0}),
}
# How often an idle worker on a standalone looks again at a route whose due records a limit holds
# back (a standalone has no change stream to tell it that a slot came free).
HELD_POLL = 0.25
# Tries of one record's slot before it is left for the next claim (each lost try is another claim
# that took a slot of the key meanwhile).
SLOT_TRIES = 4
# How long one claim goes on deciding its rates at the store time of its first decision (seconds):
# starts are stamped that much early at most.
MOMENT_KEPT = 0.5
SETTLED_INDEXES: dict[str, tuple[list[tuple[str, int]], dict[str, Any]]] = {
    "settled_child": ([("child", ASCENDING)], {}),
    "settled_expire": ([("expire_at", ASCENDING)], {"expireAfterSeconds": 0}),
}
WAITS_INDEXES: dict[str, tuple[list[tuple[str, int]], dict[str, Any]]] = {
    "waits_expire": ([("expire_at", ASCENDING)], {"expireAfterSeconds": 0}),
}
# Seconds after its finish before housekeeping completes a finished parent's count-down
# (the finishing worker normally did it at once; afterwards it presumably died on the way).
SETTLE_GRACE = 5.0
# How many dependents one step of a count-down reads or writes at once (see _settle).
SETTLE_BATCH = 1000
WORKER_INDEXES: dict[str, tuple[list[tuple[str, int]], dict[str, Any]]] = {
    "queue": ([("queue", ASCENDING)], {}),
}
STATS_INDEXES: dict[str, tuple[list[tuple[str, int]], dict[str, Any]]] = {
    "stats_minute": ([("queue", ASCENDING), ("minute", ASCENDING)], {}),
    "stats_expire": ([("expire_at", ASCENDING)], {"expireAfterSeconds": 0}),
}
_indexed: set[tuple[str, str]] = set()
# Seconds between housekeeping's checks that the indexes still exist.
INDEX_CHECK_EVERY = 5.0
# How often the estimate of the server's clock is renewed, and how far past it
# an index range reaches (the exact comparison is the $expr with $$NOW).
CLOCK_SYNC_EVERY = 30.0
# One estimate of the server's clock per process and server, shared by every connection: a pool's
# scheduler reads it to move a slot's due time and the connection it fires through reads it to move
# the time back, so the two cancel. Two estimates differ by their round trips' asymmetry: in CI a
# skewed pool's slot ran 16 ms early by the server's clock.
_CLOCKS: dict[str, tuple[float, float]] = {}  # server -> (server epoch, local monotonic) at one instant
CLOCK_SLACK = 0.25
# A name is stored in every record; max_payload leaves about 1 MiB of the
# 16 MiB document for everything else.
MAX_NAME_BYTES = 64 * 1024
# The server's clock in epoch seconds (ms resolution), inside pipelines and $expr.
NOW = {"$divide": [{"$toLong": "$$NOW"}, 1000]}
KILLED_BY_REQUEST = {"type": "JobKilled", "message": "killed by request", "traceback": ""}
_indexed_lock = threading.Lock()


T = TypeVar("T")


def _lit(value: Any) -> dict[str, Any]:
    """A constant inside a pipeline: a string starting with '$' would otherwise be a field path."""
    return {"$literal": value}


def _expire_at(finished: Any, ttl: Any) -> dict[str, Any]:
    """The date a record finished at ``finished`` (seconds, maybe an expression) expires."""
    return {"$toDate": {"$multiply": [{"$add": [finished, ttl]}, 1000]}}


def _transient(exc: OperationFailure) -> bool:
    """A server-side error that a reconnect or a new primary cures (shutdown, step-down)."""
    return exc.has_error_label("RetryableWriteError") or exc.code in TRANSIENT_CODES


# A finish leaves this mark on a record that has dependents, until they are counted.
# What a finish (or a quarantine) drops with the lease: the flow slots it held, and the mark that
# another claim took one of them from it.
SLOTS_GONE = {"flow_slot": "$$REMOVE", "route_slot": "$$REMOVE", "slot_lost": "$$REMOVE"}
_SETTLE_PENDING = {"$cond": [{"$eq": ["$has_dependents", True]}, True, "$$REMOVE"]}


@dataclass(frozen=True)
class _Via:
    """Where the workflow documents are read and written: the queue's own client, or an application's session.

    A session's operations must go through its own client (``session.client``), with the session, to be in
    its transaction; inside a transaction ``call`` runs each operation once, since a failed operation has
    aborted the transaction (``with_transaction`` retries the whole of it).
    """

    jobs: Collection[dict[str, Any]]
    deps: Collection[dict[str, Any]]
    settled: Collection[dict[str, Any]]
    waits: Collection[dict[str, Any]]
    session: ClientSession | None
    call: Callable[[str, Callable[[], Any]], Any]


class _Stale(Exception):
    """Raised inside a finish's transaction whose record left the fence: aborts it."""


def _once(what: str, op: Callable[[], T]) -> T:
    return op()


# Why a claim's run of sorted updates at the route's head ended (see _claim_heads).
_FILLED, _DRAINED, _KEYED, _HELD = "filled", "drained", "keyed", "held"


class _RouteView:
    """One claim's share of its route's own limit (``queue.limit``), decided once per claim, not
    once per record.

    Opening it reads the route's live slots once and picks up to ``want`` slot numbers that no live
    lease holds, going round from a random one so that concurrent claims seldom pick the same and
    meet at the unique index; then it takes the rate's starts for as many in one update (_grant
    with ``want``). Each record the claim takes uses one slot and one start (:meth:`take`), stamped
    with the time the starts were decided on; a record not taken after all gives them back to the
    view (:meth:`put_back`); a slot the unique index refused is swept from a record whose lease ran
    out, and the slots are counted again (:meth:`refused`). :meth:`close` gives the rate back the
    starts not used, as _ungrant does: not if another grant came since (fewer starts than allowed,
    never more), nor once their time has passed (a rate's time in the past means what none does).
    A claim that outlives MOMENT_KEPT gives back and takes its starts anew, so that no start is
    stamped more than that early.
    """

    def __init__(self, store: MongoPersistence, route: str, limit: flow.RouteLimit, want: int,
                 moment: list[float]) -> None:
        self.store, self.route, self.limit = store, route, limit
        self.left = want  # records the claim may still take
        self.moment = moment  # the claim's [store time its starts were decided on, monotonic then]
        self.slots: list[str] = []  # picked, not used yet
        self.lapsed: set[str] = set()  # slots that records whose lease ran out still hold
        self.freed_at: float | None = None  # the first live lease's end, when the slots are all taken
        self.tries = 0
        self.grant: tuple[str, str] | None = None
        self.granted = self.unused = 0
        self.until = 0.0  # the rate's time after the grant
        self.when = 0.0  # when the rate allows the next start
        self._count()
        if self.slots or limit.concurrency is None:
            self._charge()

    def _count(self) -> None:
        cap = self.limit.concurrency
        if cap is None:
            return
        live, self.lapsed = self.store._live({"route": self.route}, "route_slot")
        self.freed_at = min((float(d["lease_until"]) for d in live), default=None)
        free = min(self.left, cap - len(live))
        self.slots = [] if free <= 0 else self.store._free_slots(
            self.route, cap, {d.get("route_slot") for d in live}, self.lapsed, free, random.randrange(cap))

    def _charge(self) -> None:
        interval = self.limit.interval
        want = self.left if self.limit.concurrency is None else min(self.left, len(self.slots))
        if interval is None or want <= 0:
            return
        self.granted, self.when, self.grant, decided = self.store._grant(
            flow.route_tat(self.route), interval, self.limit.burst, None, want)
        self.moment[:] = [decided, time.monotonic()]
        self.unused = self.granted
        self.until = self.when + (self.limit.burst - 1) * interval

    def take(self) -> dict[str, Any] | None:
        """The fields of one more record's start (its route_slot, its started), or None: the
        route's limit leaves this claim no room."""
        if self.unused and time.monotonic() - self.moment[1] > MOMENT_KEPT:
            self.close()  # a long claim: its later starts get a time of their own
            self._charge()
        rated = self.limit.interval is not None
        if self.left <= 0 or (self.limit.concurrency is not None and not self.slots) or (rated and not self.unused):
            return None
        fields: dict[str, Any] = {}
        if self.limit.concurrency is not None:
            slot = fields["route_slot"] = self.slots.pop(0)
            if slot in self.lapsed:
                self.lapsed.discard(slot)
                self.store._take_slot("route_slot", slot)
        if rated:
            self.unused -= 1
            fields["started"] = self.moment[0]
        self.left -= 1
        return fields

    def put_back(self, fields: dict[str, Any]) -> None:
        """The record ``fields`` were taken for was not claimed: its slot and start are free again."""
        self.left += 1
        if "started" in fields:
            self.unused += 1
        if "route_slot" in fields:
            self.slots.insert(0, fields["route_slot"])

    def refused(self, fields: dict[str, Any]) -> None:
        """The slot's unique index refused the record's update: another claim took the slot meanwhile,
        or a record that does not run holds it. Sweep it from the latter, and count the slots again."""
        slot = fields.get("route_slot")
        self.put_back({name: value for name, value in fields.items() if name != "route_slot"})
        if slot is None:
            return
        self.tries += 1
        self.store._take_slot("route_slot", slot)
        if self.tries >= SLOT_TRIES:
            self.slots, self.freed_at = [], None  # left for the next claim
        else:
            self._count()

    def wake(self) -> float | None:
        """When the route's limit may let the next record start (None: not known)."""
        times: list[float | None] = []
        if self.limit.concurrency is not None and not self.slots:
            times.append(self.freed_at)
        if self.limit.interval is not None and not self.unused:
            times.append(self.when)
        return None if not times or None in times else max(t for t in times if t is not None)

    def close(self) -> None:
        """Give the rate back the starts granted and not used (see the class)."""
        interval, unused, grant = self.limit.interval, self.unused, self.grant
        self.unused = 0
        if not unused or interval is None or grant is None:
            return
        if self.until <= self.moment[0] + time.monotonic() - self.moment[1]:
            return  # their time has passed (a lower bound of the store's clock says so)
        self.store._ungrant([grant], None if unused == self.granted else unused * interval)


class MongoPersistence(NativeAsync, Persistence):
    name = "mongodb"
    url_schemes = ("mongodb", "mongodb+srv")
    # BSON documents are limited to 16 MiB; leave room for the record's other fields.
    max_payload = 15 * 1024 * 1024
    # A standalone cannot notify; an indexed claim is cheap, so poll it briskly.
    max_idle_poll = 0.05

    def __init__(self, queue: str, *, url: str | None = None, db: str | None = None,
                 **options: Any) -> None:
        super().__init__(queue, url=url, db=db, **options)
        self.conn_url = url or DEFAULT_URL
        self.address = redact(self.conn_url)
        query = self.conn_url.partition("?")[2].lower()
        defaults: dict[str, Any] = {k: v for k, v in {**TIMEOUTS_MS, "appname": "skunkqueue"}.items()
                                    if k.lower() + "=" not in query}
        try:
            # Retrying reads and writes is pymongo's default; say so, since the
            # reconnect story below relies on it.
            self.client_options: dict[str, Any] = {"retryWrites": True, "retryReads": True, **defaults}
            self.client: MongoClient[dict[str, Any]] = MongoClient(self.conn_url, **self.client_options)
            database = self.client[db] if db else self.client.get_default_database(DEFAULT_DB)
        except (MongoConfigurationError, ValueError, TypeError) as exc:
            raise ConfigurationError(f"Bad MongoDB address {self.address}: {self._scrub(exc)}") from None
        self._checked_client: MongoClient[dict[str, Any]] | None = None  # using=: a client known to reach us
        self._indexes_checked = time.monotonic()
        self.jobs: Collection[dict[str, Any]] = database["jobs"]
        self.worker_docs: Collection[dict[str, Any]] = database["workers"]
        self.settings: Collection[dict[str, Any]] = database["settings"]
        self.stats_docs: Collection[dict[str, Any]] = database["stats"]
        self.deps: Collection[dict[str, Any]] = database["deps"]
        self.settled: Collection[dict[str, Any]] = database["settled"]
        self.waits: Collection[dict[str, Any]] = database["waits"]
        self.flow_times: Collection[dict[str, Any]] = database["flow"]
        # Per route: (monotonic time read, paused, limit): the flow settings the claim uses.
        self._flows: dict[str, tuple[float, bool, flow.RouteLimit | None]] = {}
        # Per route whose last claim here left due records behind for a limit or a pause: when
        # one of them may be claimable (None: not known).
        self._held_back: dict[str, float | None] = {}
        # Records claimed here that had dependents then (a group's members): on a replica set their
        # finish goes straight to its transaction, without first trying the plain update that a
        # parent's mark makes match nothing (see _finish_counting).
        self._claimed_parents: set[str] = set()
        try:
            hello = self._call("connect", lambda: self.client.admin.command("hello"))
            # Change streams need an oplog: replica sets and sharded clusters have one.
            self.notifies = bool(hello.get("setName") or hello.get("msg") == "isdbgrid")
            # Multi-document transactions need the same (a replica set, or a mongos): there a parent's
            # finish counts its dependents down in one transaction with it (see finish).
            self.transactions = self.notifies
            self._lock_wait: dict[str, Any] = {"maxTimeMS": LOCK_WAIT_MS} if self.transactions else {}
            self._ensure_indexes()
            self.now()
        except BaseException:
            self.client.close()
            raise

    @classmethod
    def check_names(cls, queue: str, routes: Sequence[str] = ()) -> None:
        refuse_names_over(MAX_NAME_BYTES, cls.name, queue, routes)

    @property
    def _clock(self) -> tuple[float, float] | None:
        return _CLOCKS.get(self.conn_url)

    @_clock.setter
    def _clock(self, value: tuple[float, float]) -> None:
        _CLOCKS[self.conn_url] = value

    def now(self) -> float:
        """An estimate of the server's clock, renewed every CLOCK_SYNC_EVERY seconds.

        Only index ranges and waits use it: decisions compare with ``$$NOW``.
        """
        clock = self._clock
        if clock is None or time.monotonic() - clock[1] > CLOCK_SYNC_EVERY:
            sent = time.monotonic()
            hello = self._call("clock", lambda: self.client.admin.command("hello"))
            clock = self._set_clock(hello, sent)
        return clock[0] + time.monotonic() - clock[1]

    def _clock_is_fresh(self) -> bool:
        return self._clock is not None and time.monotonic() - self._clock[1] <= CLOCK_SYNC_EVERY

    def _set_clock(self, hello: Mapping[str, Any], sent: float) -> tuple[float, float]:
        """Keep the server's time from ``hello`` (asked at monotonic ``sent``) as of the middle of the trip."""
        received = time.monotonic()
        server = hello["localTime"]
        if server.tzinfo is None:
            server = server.replace(tzinfo=timezone.utc)
        clock = self._clock = (server.timestamp(), (sent + received) / 2)
        return clock

    def _shift(self) -> float:
        """How far to move times this host computed onto the server's clock (0 while they agree)."""
        return _shift_from(self.now())

    # -- plumbing ------------------------------------------------------------------

    def _scrub(self, exc: BaseException | str) -> str:
        text = scrub(str(exc), self.conn_url)
        # Server-selection errors append the whole topology description.
        return text.split(", Timeout:")[0][:300]

    def _call(self, what: str, op: Callable[[], T], *, idempotent: bool = True) -> T:
        """Run ``op``, turning pymongo's connection errors into BackendUnavailable.

        pymongo already retries one interrupted read or write where the server
        makes that safe (retryable writes need a replica set). Operations that
        are safe to repeat get one more try here, which also covers a
        standalone server that restarted; claim and finish are not, because
        their first attempt may have been applied.
        """
        for attempt in (1, 2):
            try:
                return op()
            except PyMongoError as exc:
                self._retry_or_raise(what, exc, last=not idempotent or attempt == 2)
        raise AssertionError("unreachable")

    def _retry_or_raise(self, what: str, exc: PyMongoError, *, last: bool) -> None:
        """Raise SkunkQueue's error for ``exc`` (or ``exc`` itself), or return when one more try may cure it.

        Shared by :meth:`_call` and the asyncio side's (aio.py), whose client raises the same errors.
        """
        if isinstance(exc, ServerSelectionTimeoutError):
            # Already waited the whole selection timeout: no server to retry on.
            raise BackendUnavailable(f"Cannot reach MongoDB at {self.address} ({what}): "
                                     f"{self._scrub(exc)}") from None
        if isinstance(exc, AutoReconnect):
            if last:
                raise BackendUnavailable(f"Lost the connection to MongoDB at {self.address} ({what}): "
                                         f"{self._scrub(exc)}") from None
            log.warning("mongodb %s: %s was interrupted (%s); retrying", self.address, what, self._scrub(exc))
            return
        if isinstance(exc, ConnectionFailure):
            raise BackendUnavailable(f"Cannot reach MongoDB at {self.address} ({what}): "
                                     f"{self._scrub(exc)}") from None
        if isinstance(exc, OperationFailure):
            if exc.code == MAX_TIME_EXPIRED:
                raise RecordHeld(f"MongoDB at {self.address}: {what} waited over {LOCK_WAIT_MS} ms for a record "
                                 "an unfinished transaction holds; try again") from None
            if _transient(exc):
                if last:
                    raise BackendUnavailable(f"MongoDB at {self.address} is unavailable ({what}): "
                                             f"{self._scrub(exc)}") from None
                log.warning("mongodb %s: %s was interrupted (%s); retrying", self.address, what,
                            self._scrub(exc))
                return
            if exc.code in ACCESS_DENIED:
                raise BackendUnavailable(f"MongoDB at {self.address} refused access ({what}): "
                                         f"{self._scrub(exc)}") from None
        raise exc

    def _indexed_collections(self) -> list[tuple[Collection[dict[str, Any]], dict[str, Any]]]:
        return [(self.jobs, INDEXES), (self.worker_docs, WORKER_INDEXES), (self.stats_docs, STATS_INDEXES),
                (self.deps, DEPS_INDEXES), (self.settled, SETTLED_INDEXES), (self.waits, WAITS_INDEXES),
                (self.flow_times, FLOW_INDEXES)]

    def _check_indexes(self) -> None:
        """Re-create indexes someone dropped (a dropDatabase under live workers): housekeeping's part."""
        if time.monotonic() - self._indexes_checked < INDEX_CHECK_EVERY:
            return
        self._indexes_checked = time.monotonic()
        for collection, indexes in self._indexed_collections():
            present = set(self._call("list indexes", collection.index_information))
            missing = sorted(set(indexes) - present)
            if missing:
                log.warning("mongodb %s: indexes %s of %s.%s were missing; re-creating them", self.address,
                            ", ".join(missing), collection.database.name, collection.name)
                self._ensure_indexes(force=True)
                return

    def _ensure_indexes(self, force: bool = False) -> None:
        key = (self.conn_url, self.jobs.database.name)
        with _indexed_lock:
            if key in _indexed and not force:
                return
            for collection, indexes in self._indexed_collections():
                # One command per collection (every worker process starts with these); creating an
                # index that exists as it is changes nothing.
                models = [IndexModel(keys, name=index_name, **index_options)
                          for index_name, (keys, index_options) in indexes.items()]
                self._call("create index", partial(collection.create_indexes, models))
            if "claim" in self._call("list indexes", self.jobs.index_information):
                # Left by a version before priorities, whose records have no priority field and would
                # sort after every priority: they get 0, the default, before claim_priority takes
                # over. Done again if this process dies before the drop (then the index is still there).
                self._call("give priorities", partial(
                    self.jobs.update_many, {"priority": {"$exists": False}, "state": {"$nin": list(FINISHED_STATES)}},
                    {"$set": {"priority": 0}}))
                try:
                    self._call("drop index", partial(self.jobs.drop_index, "claim"))
                except OperationFailure as exc:
                    if exc.code != INDEX_NOT_FOUND:  # another process dropped it first
                        raise
            _indexed.add(key)

    def _claimable(self, routes: Sequence[str], worker_id: str) -> dict[str, Any]:
        return {"queue": self.queue, "route": {"$in": list(routes)}, "state": PENDING,
                "target": {"$in": [None, worker_id]}}

    def _quarantine(self, job_id: Any, why: str, only_if: Mapping[str, Any] | None = None) -> None:
        # Keep the damaged document for inspection but take it out of every route.
        error = policy.quarantined(why).error
        self._call("quarantine", lambda: self.jobs.update_one(
            {"_id": job_id, **(only_if or {})},
            [{"$set": {"state": ERROR, "dead": True, "error": _lit(error), "owner": None, "lease_until": None,
                       "finished": NOW, "expire_at": _expire_at(NOW, self.result_ttl), **SLOTS_GONE}}]))
        log.warning("mongodb: quarantined record %r of queue %s: %s", job_id, self.queue, why)

    # -- producers -----------------------------------------------------------------

    def enqueue(self, records: Sequence[JobRecord]) -> None:
        self.enqueue_keyed(records)

    def enqueue_keyed(self, records: Sequence[JobRecord]) -> list[str]:
        holders = [record.id for record in records]
        if not records:
            return holders
        docs = _docs(records, self._shift())
        held, stored, retried = self._insert(docs)
        # Stored before this call (sent again): attached then. Once the insert was sent twice, a stored
        # _id may be this call's own first try instead: a step among those is attached now only if its
        # first edge is not there yet (attached again, its count of parents left would start over, and
        # a parent counted already is not counted twice: it would wait for ever).
        before, unsure = ([], stored) if retried else (stored, [])
        for index in held:
            holders[index], inserted = self._key_holder(docs[index])
            if holders[index] == records[index].id and not inserted:
                (unsure if retried else before).append(index)  # its key held by itself: sent again
        before += [index for index in unsure if records[index].parents and self._attached(records[index])]
        for index, (record, holder) in enumerate(zip(records, holders)):
            # A step stored before this call was attached then (attaching again would count its
            # parents anew). One whose first try went in unseen was not: attached now.
            if record.parents and holder == record.id and index not in before:
                self._attach(record)
        return holders

    supports_using = True

    def enqueue_in(self, handle: Any, records: Sequence[JobRecord]) -> list[str]:
        """Store the records with ``handle``, the application's pymongo ``ClientSession``.

        In the session's transaction when one is open (``session.start_transaction()`` or
        ``with_transaction``): the jobs exist exactly if it commits, and the change stream that
        wakes workers sees them at the commit. A session with no transaction open stores them at
        once. Transactions need a replica set (or a sharded cluster). MongoDB has no savepoints,
        so a failure here aborts the application's transaction; a key taken by a transaction that
        commits first is a write conflict whose error carries ``TransientTransactionError``, which
        ``with_transaction`` retries.

        Workflows (``after=``, ``chain``, ``group``): the dependency documents (waits, deps) and the
        parents' ``has_dependents`` marks are written in the same transaction, and a parent found
        finished in it is counted in it, so an abort leaves no trace on a parent either. Marking a
        parent writes its document: a worker claiming that parent meanwhile waits for the
        transaction's end (renewing or finishing it waits ``LOCK_WAIT_MS`` at a time, then skips the
        renewal or raises ``RecordHeld`` and tries again), and a parent that changed since the transaction began
        makes it a write conflict (``TransientTransactionError``, which ``with_transaction`` retries).
        """
        if not records:
            self._check_session(handle, reach=False)
            return []
        via = self._check_session(handle)
        jobs = via.jobs
        docs = _docs(records, self._shift())
        holders = [record.id for record in records]
        stored: set[int] = set()

        def insert(index: int, doc: dict[str, Any]) -> None:
            # Only if its _id is new: one stored already is the record sent again (the application
            # ran its transaction again after a lost reply), maybe running now: left as it is. Not
            # insert_one: its duplicate-key error would abort the application's transaction.
            fields = {name: value for name, value in doc.items() if name != "_id"}
            if jobs.update_one({"_id": doc["_id"]}, {"$setOnInsert": fields}, upsert=True,
                               session=handle).upserted_id is not None:
                stored.add(index)

        try:
            for index, doc in enumerate(docs):
                if doc.get("key") is None:
                    insert(index, doc)
                    continue
                holder = jobs.find_one({"queue": self.queue, "key": doc["key"]}, {"_id": 1, "expire_at": 1},
                                       session=handle)
                if holder is not None and not _holder_expired(holder, self.now()):
                    holders[index] = str(holder["_id"])
                    continue
                if holder is not None:  # past its expiry, waiting for the TTL monitor: the key is free
                    jobs.delete_one({"_id": holder["_id"], "key": doc["key"]}, session=handle)
                insert(index, doc)
            for index, record in enumerate(records):
                if record.parents and index in stored:
                    self._attach(record, via)
        except DocumentTooLarge as exc:
            raise PayloadTooLarge(f"A record is too large for a MongoDB document: {exc}") from None
        except OperationFailure as exc:
            if exc.code == 20 or "Transaction numbers" in str(exc):  # IllegalOperation: no transactions here
                raise ConfigurationError(f"MongoDB at {self.address} cannot run transactions: {self._scrub(exc)}; "
                                         "run a replica set, or fire after your writes.") from None
            raise
        return holders

    def get_many_in(self, handle: Any, job_ids: Sequence[str]) -> list[JobRecord | None]:
        via = self._check_session(handle)
        found: dict[str, JobRecord] = {}
        for start in range(0, len(job_ids), 1000):
            query = {"_id": {"$in": list(job_ids[start:start + 1000])}, "queue": self.queue,
                     **_not_expired(self.now())}
            for doc in via.call("get", partial(self._find_all, via.jobs, query, None, handle)):
                found[str(doc["_id"])] = _to_record(doc)
        return [found.get(job_id) for job_id in job_ids]

    def _check_session(self, handle: Any, reach: bool = True) -> _Via:
        """Refuse a handle that is no session of the queue's deployment, or a transaction a standalone
        cannot run, in one line; return the documents as the session reaches them."""
        if not isinstance(handle, ClientSession):
            raise ConfigurationError(
                f"using= takes a pymongo ClientSession for the mongodb backend (client.start_session()), not "
                f"{type(handle).__module__}.{type(handle).__qualname__}.")
        if reach:
            self._check_same_cluster(handle)
            if handle.in_transaction and not self.notifies:
                raise ConfigurationError(f"MongoDB at {self.address} is standalone: it has no transactions; "
                                         "run a replica set, or fire after your writes.")
        return self._via(handle)

    def _via(self, handle: ClientSession) -> _Via:
        """The workflow documents as ``handle`` reaches them: through its client, with it."""
        database = handle.client[self.jobs.database.name]
        return _Via(database[self.jobs.name], database[self.deps.name], database[self.settled.name],
                    database[self.waits.name], handle, _once if handle.in_transaction else self._call)

    def _check_same_cluster(self, handle: ClientSession) -> None:
        """Refuse a session of a client that reaches another deployment than the queue's (once per client)."""
        theirs_client = handle.client
        if self._checked_client is theirs_client:
            return

        def process(client: MongoClient[dict[str, Any]]) -> Any:
            hello = client.admin.command("hello")
            return hello.get("setName"), (hello.get("topologyVersion") or {}).get("processId")

        theirs = process(theirs_client)
        ours = self._call("identify", lambda: process(self.client))
        if theirs != ours:
            raise ConfigurationError(
                f"The session given with using= belongs to a client of another MongoDB deployment than the "
                f"queue's ({self.address}); start it from a client of the queue's.")
        self._checked_client = theirs_client

    def _insert(self, docs: list[dict[str, Any]]) -> tuple[list[int], list[int], bool]:
        """Insert every document (unordered: one refused does not stop the others).

        Returns the positions of those refused because their key is held, of those whose ``_id``
        was stored already (sent again: left as they are), and whether the insert was sent more
        than once (then a stored ``_id`` may be this call's own first try).
        """
        attempts = 0
        refused: tuple[list[int], list[int]] = ([], [])

        def insert() -> None:
            nonlocal attempts, refused
            attempts += 1
            try:
                self.jobs.insert_many(docs, ordered=False)
                refused = ([], [])
            except BulkWriteError as exc:
                refused = _refused_by_key(exc, attempts)
            except DocumentTooLarge as exc:
                raise PayloadTooLarge(f"A record is too large for a MongoDB document: {exc}") from None

        self._call("enqueue", insert)
        held, stored = refused
        return held, stored, attempts > 1

    def _attached(self, record: JobRecord) -> bool:
        """Whether a stored step has been attached: its first parent's edge exists (see _attach)."""
        edge = f"{dependencies.unique(record.parents or ())[0]}/{record.id}"
        return self._call("attached", lambda: self.deps.find_one({"_id": edge}, {"_id": 1})) is not None

    def _key_holder(self, doc: dict[str, Any]) -> tuple[str, bool]:
        """The id of the record holding ``doc``'s key: an existing live one, or ``doc`` once stored;
        and whether this call stored it."""
        key = doc["key"]
        for _ in range(KEY_ROUNDS):
            holder = self._call("find key holder", lambda: self.jobs.find_one(
                {"queue": self.queue, "key": key}, {"_id": 1, "expire_at": 1}))
            if holder is not None:
                if not _holder_expired(holder, self.now()):
                    return str(holder["_id"]), False
                # Past its expiry, waiting for the TTL monitor: gone as far as get() is concerned, so
                # the key is free. Deleting it (only as it was seen) lets the unique index take ours.
                self._call("drop expired key holder", partial(
                    self.jobs.delete_one, {"_id": holder["_id"], "queue": self.queue, "key": key,
                                           "expire_at": holder.get("expire_at")}))
            try:
                self._call("enqueue", lambda: self.jobs.insert_one(doc))
                return str(doc["_id"]), True
            except DuplicateKeyError as exc:
                if _on_id_index(exc.details):
                    # Not stored when insert_many refused it for its key: so this insert's own first
                    # try went in (a lost reply, tried again). Left as it is, and counted as ours.
                    return str(doc["_id"]), True
                continue  # someone else took the key (or our own insert went in on a retry): read again
            except DocumentTooLarge as exc:
                raise PayloadTooLarge(f"A record is too large for a MongoDB document: {exc}") from None
        raise BackendUnavailable(f"MongoDB at {self.address}: the key {key!r} of queue {self.queue!r} changed "
                                 f"hands {KEY_ROUNDS} times while enqueueing; try again")

    def get(self, job_id: str) -> JobRecord | None:
        doc = self._call("get", lambda: self.jobs.find_one(
            {"_id": job_id, "queue": self.queue, **_not_expired(self.now())}))
        return None if doc is None else _to_record(doc)

    def _look_again(self, job_id: str, last: JobRecord) -> JobRecord | None:
        # The state alone while it stays what the last look saw: a callback's record holds all its
        # parents' ids, and the whole of it was most of the large-group test's reads.
        doc = self._call("get", lambda: self.jobs.find_one(
            {"_id": job_id, "queue": self.queue, **_not_expired(self.now())}, {"state": 1}))
        if doc is None:
            return None
        return last if doc.get("state") == last.state else self.get(job_id)

    def list_jobs(self, *, route: str | None = None, state: str | None = None,
                  dead: bool | None = None, limit: int = 1000) -> list[JobRecord]:
        query: dict[str, Any] = {"queue": self.queue, **_not_expired(self.now())}
        if route is not None:
            query["route"] = route
        if state is not None:
            query["state"] = state
        if dead is not None:
            query["dead"] = True if dead else {"$ne": True}

        def read() -> list[JobRecord]:
            records: list[JobRecord] = []
            with self.jobs.find(query, sort=[("due", ASCENDING), ("_id", ASCENDING)]) as cursor:
                for doc in cursor:
                    try:
                        records.append(_to_record(doc))
                    except MalformedRecord:
                        continue
                    if len(records) >= limit:
                        break
            return records

        return self._call("list jobs", read)

    # Documents one list_page call looks at past its cursor, however few of them match its filters.
    PAGE_SCAN = 1000

    pages_newest_first = True

    def list_page(self, *, route: str | None = None, state: str | None = None, dead: bool | None = None,
                  limit: int = 100, after: str | None = None,
                  newest: bool = False) -> tuple[list[JobRecord], str | None]:
        # Keyset paging in _id (creation) order on the _id index: a call looks at the filter fields of at
        # most PAGE_SCAN documents and reads in full only those it returns, however deep the page and
        # however rarely the filters match; the default offset cursor re-read every earlier page.
        # The cursor is "i:<the last _id looked at>" ("n:" newest first: the _id index read backwards).
        mark = "n:" if newest else "i:"
        if after is not None and not after.startswith(mark):
            raise ValueError(f"{after!r} is not a page cursor of this store")
        scan = max(limit, self.PAGE_SCAN)
        query: dict[str, Any] = {"queue": self.queue, **_not_expired(self.now())}
        if after:
            query["_id"] = {"$lt" if newest else "$gt": after[2:]}
        direction = DESCENDING if newest else ASCENDING

        def read() -> tuple[list[JobRecord], str | None]:
            heads = list(self.jobs.find(query, {"route": 1, "state": 1, "dead": 1}, sort=[("_id", direction)],
                                        limit=scan, hint=[("_id", ASCENDING)]))
            chosen: list[Any] = []
            more = len(heads) == scan
            for n, head in enumerate(heads, 1):
                if ((route is not None and head.get("route") != route)
                        or (state is not None and head.get("state") != state)
                        or (dead is not None and (head.get("dead") is True) != dead)):
                    continue
                chosen.append(head["_id"])
                if len(chosen) == limit:
                    more, heads = n < len(heads) or more, heads[:n]
                    break
            found = {doc["_id"]: doc for doc in self.jobs.find({"_id": {"$in": chosen}})} if chosen else {}
            records = []
            for job_id in chosen:
                try:
                    records.append(_to_record(found[job_id]))
                except (KeyError, MalformedRecord):  # deleted since, or damaged
                    continue
            return records, (f"{mark}{heads[-1]['_id']}" if more and heads else None)

        return self._call("list jobs", read)

    def counts(self) -> dict[tuple[str, str], int]:
        pipeline = [{"$match": {"queue": self.queue, **_not_expired(self.now())}},
                    {"$group": {"_id": {"route": "$route", "state": "$state"}, "n": {"$sum": 1}}}]
        rows = self._call("counts", lambda: list(self.jobs.aggregate(pipeline)))
        return {(str(row["_id"].get("route")), str(row["_id"].get("state"))): int(row["n"]) for row in rows}

    def purge(self, route: str, *, target: str | None = None) -> int:
        query: dict[str, Any] = {"queue": self.queue, "route": route, "state": PENDING}
        if target is not None:
            query["target"] = target
        return self._call("purge", lambda: self.jobs.delete_many(query)).deleted_count

    def request_kill(self, job_id: str) -> bool:
        result = self._call("kill", lambda: self.jobs.update_one(
            {"_id": job_id, "queue": self.queue, "state": RUNNING}, {"$set": {"kill_requested": True}}))
        # matched, not modified: a second kill request on a running job is still a yes.
        return result.matched_count == 1

    # -- workers -------------------------------------------------------------------

    # Flow control: claimable records go by (priority descending, due, _id). A record with a
    # limit_key is taken by _claim_held: it counts the live leases (lease_until after $$NOW) of its
    # key, and takes a free numbered slot (flow_slot, a unique index) with the record, in the
    # record's one update: two claims racing for a slot cannot both write it, and a slot whose
    # holder's lease ran out is taken from it (the holder is marked slot_lost, and renew refuses it
    # from then on). A route's own limit is decided once per claim (_RouteView): one count of the
    # route's live leases picks the claim's route_slots (a unique index too), one grant takes its
    # starts, and the records at the head are taken by the sorted update of an unlimited route,
    # each with one of those slots and starts (_claim_heads); behind a keyed record, _claim_held
    # takes them from the same view.
    #
    # No transactions are needed, so a standalone mongod enforces all of it: a slot is a field of
    # the record that holds it, written by the claim's update and dropped by the finish's, one
    # document each time. A finish repeated after a lost reply is fenced by the token and drops
    # nothing twice; a worker that dies leaves a slot whose lease runs out, which frees it for
    # counting at once, is taken over by the next claim that needs it, and goes for good when
    # housekeeping hands the record back (a finish). Rates are GCRA times in the flow
    # collection, charged by one upsert before the records' updates (see _grant); a process that
    # dies between the two leaves the starts it was granted unused: fewer than allowed, never more.
    supports_priorities = True
    supports_limits = True
    supports_pause = True
    CLAIM_ORDER = [("priority", DESCENDING), ("due", ASCENDING), ("_id", ASCENDING)]

    def _claimed(self, doc: dict[str, Any]) -> JobRecord:
        record = _to_record(doc)
        if doc.get("has_dependents") and self.transactions:
            if len(self._claimed_parents) > CLAIMED_PARENTS_KEPT:
                self._claimed_parents.clear()  # ids of leases lost or handed back, never finished here
            self._claimed_parents.add(record.id)
        return record

    def _claim_update(self, worker_id: str, lease: float, extra: Mapping[str, Any] | None = None,
                      only_if: Any = None) -> list[dict[str, Any]]:
        fields: dict[str, Any] = {
            "state": RUNNING, "owner": _lit(worker_id), "lease_until": {"$add": [NOW, lease]},
            "started": NOW, "kill_requested": False,
            "token": {"$add": [{"$ifNull": ["$token", 0]}, 1]},
            "attempts": {"$add": [{"$ifNull": ["$attempts", 0]}, 1]}, **(extra or {})}
        if only_if is not None:
            # Leave the document as it is (no write) unless only_if holds.
            fields = {name: {"$cond": [only_if, value, "$" + name]} for name, value in fields.items()}
        return [{"$set": fields}]

    def _route_flow(self, route: str) -> tuple[bool, flow.RouteLimit | None]:
        """The route's paused flag and limit, read at most SETTINGS_TTL seconds ago."""
        now = time.monotonic()
        found = self._flows.get(route)
        if found is None or now - found[0] > flow.SETTINGS_TTL:
            names = [flow.pause_setting(route), flow.limit_setting(route)]
            docs = self._call("flow settings", lambda: list(self.settings.find(
                {"_id": {"$in": [self._setting_id(n) for n in names]}})))
            values = {doc["_id"].get("n"): doc.get("value") for doc in docs if isinstance(doc.get("_id"), dict)}
            limit = values.get(names[1])
            found = self._flows[route] = (now, names[0] in values,
                                          flow.RouteLimit.from_json(limit if isinstance(limit, str) else None))
        return found[1], found[2]

    def claim(self, route: str, worker_id: str, lease: float, limit: int = 1) -> list[JobRecord]:
        paused, route_limit = self._route_flow(route)
        if paused:
            self._held_back[route] = None
            return []
        query = self.claim_filter(route, worker_id)
        # The store time this claim decides its rates on, from its first grant, and when that was
        # read on this host's monotonic clock (see _claim_one).
        moment: list[float] = []
        view = None if route_limit is None else _RouteView(self, route, route_limit, limit, moment)
        try:
            claimed, ended = self._claim_heads(worker_id, lease, limit, query, view)
            if ended == _KEYED:  # a record with a limit key at the head: the careful way from here
                return claimed + self._claim_held(route, worker_id, lease, limit - len(claimed), view, query,
                                                  moment)
        finally:
            if view is not None:
                view.close()
        if ended == _HELD and view is not None:
            self._held_back[route] = view.wake()
        else:
            self._held_back.pop(route, None)
        return claimed

    def _claim_heads(self, worker_id: str, lease: float, limit: int, query: dict[str, Any],
                     view: _RouteView | None) -> tuple[list[JobRecord], str]:
        """Take the route's head, one sorted update per record, while it has no limit key: the
        common claim. On a route with its own limit each record takes a slot and a start of the
        claim's ``view``. (The records, and why it stopped: _FILLED, _DRAINED, _KEYED or _HELD,
        the route's limit left no room.)"""
        plain = {"$ne": [{"$type": "$limit_key"}, "string"]}
        update = self._claim_update(worker_id, lease, only_if=plain)
        claimed: list[JobRecord] = []
        while len(claimed) < limit:
            taken: dict[str, Any] = {}
            if view is not None:
                found = view.take()
                if found is None:
                    return claimed, _HELD
                taken = found
                update = self._claim_update(worker_id, lease, {name: _lit(v) for name, v in taken.items()},
                                            only_if=plain)
            try:
                doc = self._call("claim", partial(
                    self.jobs.find_one_and_update, query, update, sort=self.CLAIM_ORDER,
                    return_document=ReturnDocument.AFTER), idempotent=False)
            except DuplicateKeyError:
                if view is None:
                    raise
                view.refused(taken)  # another claim took that slot meanwhile (or a record left it)
                continue
            except OperationFailure as exc:
                if view is not None:
                    view.put_back(taken)
                if exc.code not in TYPE_MISMATCH:
                    raise
                self._quarantine_head(query, exc)
                continue
            if doc is None or doc.get("state") != RUNNING:  # none left, or a limited record at the head
                if view is not None:
                    view.put_back(taken)
                return claimed, _DRAINED if doc is None else _KEYED
            try:
                claimed.append(self._claimed(doc))
            except MalformedRecord as exc:
                self._quarantine(doc["_id"], str(exc))  # its slot goes with it; its start stays spent
                if view is not None:
                    view.put_back({})
        return claimed, _FILLED

    def _quarantine_head(self, query: dict[str, Any], exc: OperationFailure) -> None:
        # A foreign document whose counters are not numbers refuses $add and would block the
        # head of the route: quarantine it and go on.
        head = self._call("claim", lambda: self.jobs.find_one(query, {"_id": 1}, sort=self.CLAIM_ORDER))
        if head is None:
            return
        self._quarantine(head["_id"], f"cannot be claimed: {self._scrub(exc)}", only_if={"$or": [
            {name: {"$exists": True, "$not": {"$type": "number"}}} for name in ("token", "attempts")]})

    def _live(self, query: dict[str, Any], field: str) -> tuple[list[dict[str, Any]], set[str]]:
        """Running records matching ``query`` whose lease is live by the server's clock, and the
        ``field`` slots that the others (their lease ran out) still hold."""
        docs = self._call("count slots", lambda: list(self.jobs.find(
            {"queue": self.queue, "state": RUNNING, **query},
            {"lease_until": 1, field: 1, "live": {"$gt": ["$lease_until", NOW]}})))
        live = [doc for doc in docs if doc.get("live") is True]
        lapsed = {doc[field] for doc in docs if doc.get("live") is not True and isinstance(doc.get(field), str)}
        return live, lapsed

    @staticmethod
    def _free_slots(prefix: str, cap: int, held: set[Any], lapsed: set[str], n: int, start: int = 0) -> list[str]:
        """Up to ``n`` slot names below ``cap`` that no live record holds (``held``), going round
        from number ``start``: first those no lapsed record holds either, then lapsed ones (taking
        one from its holder costs a round trip: _take_slot)."""
        fresh: list[str] = []
        old: list[str] = []
        for step in range(cap):
            if len(fresh) >= n:
                break
            slot = f"{prefix}#{(start + step) % cap}"
            if slot not in held:
                (old if slot in lapsed else fresh).append(slot)
        return (fresh + old)[:n]

    def _take_slot(self, field: str, slot: str) -> None:
        """Take ``slot`` from a record whose lease ran out (or that is not running): it keeps the field
        until housekeeping hands it back, but the slot is free now. Only while that lease is still out;
        the record is marked slot_lost: its lease is gone for good (renew refuses it), or a late renewal
        of the lapsed lease would run it beside the slot's new holder."""
        self._call("free slot", partial(
            self.jobs.update_many, {"queue": self.queue, field: slot, "$expr": {"$lte": ["$lease_until", NOW]}},
            [{"$set": {field: "$$REMOVE", "slot_lost": True}}]))

    def _claim_held(self, route: str, worker_id: str, lease: float, limit: int, view: _RouteView | None,
                    query: dict[str, Any], moment: list[float]) -> list[JobRecord]:
        """Claim in order, skipping records a limit stops (no head-of-line blocking), looking at
        no more than FLOW_SCAN records."""
        claimed: list[JobRecord] = []
        blocked: set[str] = set()
        held, wake = False, None

        def later(at: float | None) -> None:
            nonlocal held, wake
            held = True
            if at is not None:
                wake = at if wake is None else min(wake, at)

        fields = {"_id": 1, "limit_key": 1, "limit_concurrency": 1, "limit_interval": 1, "limit_burst": 1}
        # Read as far as needed: a batch at a time, FLOW_SCAN at most.
        scan = flow.FLOW_SCAN + limit  # FLOW_SCAN past those taken
        candidates = self._candidates(query, fields, limit + 16, scan)
        looked = 0
        with contextlib.closing(candidates):
            while len(claimed) < limit:
                cand = next(candidates, None)
                if cand is None:
                    if looked >= scan:
                        held = True  # records past the scan may be claimable: look again soon
                    break
                looked += 1
                key = cand.get("limit_key") if isinstance(cand.get("limit_key"), str) else None
                if key is not None and key in blocked:
                    continue
                taken, stop, at = self._claim_one(worker_id, lease, cand, key, view, query, moment)
                if taken is not None:
                    claimed.append(taken)
                    continue
                if at is not None or stop:
                    later(at if at is not None and at > 0 else None)
                if stop:
                    break  # the route's own limit stops the claim
                if key is not None and at is not None:
                    blocked.add(key)
        if held and len(claimed) < limit:
            self._held_back[route] = wake
        else:
            self._held_back.pop(route, None)
        return claimed

    def _candidates(self, query: dict[str, Any], fields: dict[str, Any], first: int,
                    scan: int) -> Generator[dict[str, Any], None, None]:
        """Up to ``scan`` claimable records in claim order: ``first`` of them by one find that
        leaves no cursor open (the common claim needs no more, and closing a cursor is one more
        round trip), then, only if the claim looks further, the rest by a cursor."""
        batch = self._call("claim", lambda: list(self.jobs.find(query, fields, sort=self.CLAIM_ORDER,
                                                                limit=first)), idempotent=False)
        yield from batch
        if len(batch) < first:
            return
        seen = {doc["_id"] for doc in batch}  # those still pending come again: the order starts over
        cursor = self.jobs.find(query, fields, sort=self.CLAIM_ORDER, limit=scan + len(batch), batch_size=first)
        with cursor:
            given = len(batch)
            while given < scan:
                cand = self._call("claim", lambda: next(cursor, None), idempotent=False)
                if cand is None:
                    return
                if cand["_id"] not in seen:
                    given += 1
                    yield cand

    def _claim_one(self, worker_id: str, lease: float, cand: dict[str, Any], key: str | None,
                   view: _RouteView | None, query: dict[str, Any],
                   moment: list[float]) -> tuple[JobRecord | None, bool, float | None]:
        """(the record, if taken; whether the route's limit stops the claim; when a limit may let
        it start, 0 when not known, None when nothing stopped it and it was simply gone).

        ``moment`` holds the store time of this claim's first rate decision once there is one.
        Later decisions of the claim are made at that time (for MOMENT_KEPT seconds), and the
        records it takes are stamped with it: GCRA's bound holds for the times its decisions
        used, whatever their order (each time is at least the previous start's tat less the
        tolerance), and a decision at an earlier time is only stricter. So the starts as stored
        keep every rate exactly, and a burst starts at one time however many round trips its
        records take, as in one transaction of a SQL store. On a route with its own rate the
        moment is the ``view``'s grant (which renews it when it is older than MOMENT_KEPT)."""
        cap = cand.get("limit_concurrency") if key is not None else None
        interval = cand.get("limit_interval") if key is not None else None
        sweep = False
        for _ in range(SLOT_TRIES):
            extra: dict[str, Any] = {}
            taken: dict[str, Any] = {}
            if view is not None:
                found = view.take()
                if found is None:
                    return None, True, view.wake() or 0.0
                taken = found
                extra.update(taken)
            if "started" not in extra and moment and time.monotonic() - moment[1] > MOMENT_KEPT:
                moment.clear()  # a long claim: its later starts get a time of their own
            if isinstance(cap, int):
                live, lapsed = self._live({"limit_key": key}, "flow_slot")
                if len(live) >= cap:
                    if view is not None:
                        view.put_back(taken)
                    return None, False, min(float(d["lease_until"]) for d in live)
                [slot] = self._free_slots(str(key), cap, {d.get("flow_slot") for d in live}, lapsed, 1)
                if sweep or slot in lapsed:
                    self._take_slot("flow_slot", slot)
                extra["flow_slot"] = slot
            grants: list[tuple[str, str]] = []
            if isinstance(interval, (int, float)) and key is not None:
                burst = cand.get("limit_burst")
                granted, at, grant, decided = self._grant(flow.key_tat(key), float(interval),
                                                          burst if isinstance(burst, int) else 1,
                                                          moment[0] if moment else None)
                moment[:] = moment or [decided, time.monotonic()]
                if not granted:
                    if view is not None:
                        view.put_back(taken)
                    return None, False, at
                grants.append(grant)
                extra["started"] = moment[0]
            update = self._claim_update(worker_id, lease, {name: _lit(v) for name, v in extra.items()})
            try:
                doc = self._call("claim", partial(
                    self.jobs.find_one_and_update, {**query, "_id": cand["_id"]}, update,
                    return_document=ReturnDocument.AFTER), idempotent=False)
            except DuplicateKeyError as exc:
                self._ungrant(grants)
                if view is not None:
                    # The key's slot or the route's: another claim took it meanwhile (or a record left it).
                    pattern = (exc.details or {}).get("keyPattern") or {}
                    (view.put_back if "flow_slot" in pattern else view.refused)(taken)
                sweep = True
                continue  # count again
            except OperationFailure as exc:
                self._ungrant(grants)
                if view is not None:
                    view.put_back(taken)
                if exc.code not in TYPE_MISMATCH:
                    raise
                self._quarantine_head({**query, "_id": cand["_id"]}, exc)
                return None, False, None
            if doc is None:
                self._ungrant(grants)
                if view is not None:
                    view.put_back(taken)
                return None, False, None  # taken by another claim (or no longer due)
            try:
                return self._claimed(doc), False, None
            except MalformedRecord as exc:
                self._quarantine(doc["_id"], str(exc))
                return None, False, None
        return None, False, 0.0

    def _grant(self, name: str, interval: float, burst: int, at_time: float | None = None,
               want: int = 1) -> tuple[int, float, tuple[str, str], float]:
        """Up to ``want`` starts against a rate at one time, decided and charged by the server in one
        update (flow.gcra's rule for each start in turn) on $$NOW, or on ``at_time``, a time this
        claim read from the server a moment ago: (how many were granted, 0 for none; when the next
        start would be allowed; (name, this grant's nonce); the time it was decided on)."""
        nonce = uuid.uuid4().hex
        tolerance = (burst - 1) * interval
        at = {"$max": [{"$ifNull": ["$tat", 0]}, "$$n"]}
        # The k-th start (from 0) at time n is allowed while at + k * interval - n <= tolerance.
        room = {"$add": [{"$floor": {"$divide": [{"$subtract": [tolerance + 1e-9, {"$subtract": [at, "$$n"]}]},
                                                 interval]}}, 1]}
        now: Any = NOW if at_time is None else _lit(at_time)
        ok = {"$gt": ["$_c.k", 0]}
        until = {"$add": ["$_c.at", {"$multiply": ["$_c.k", interval]}]}  # the rate's time after the grant
        pipeline: list[dict[str, Any]] = [{"$set": {"_c": {"$let": {"vars": {"n": now}, "in": {
            "k": {"$max": [0, {"$min": [want, room]}]}, "at": at, "now": "$$n"}}}}},
            {"$set": {
                "prev": {"$cond": [ok, {"$ifNull": ["$tat", None]}, "$prev"]},
                "grant": {"$cond": [ok, nonce, {"$ifNull": ["$grant", None]}]},
                "granted": "$_c.k",
                "tat": {"$cond": [ok, until, "$tat"]},
                "when": {"$subtract": [until, tolerance]},
                "decided": "$_c.now",
                "expire_at": {"$toDate": {"$multiply": [{"$add": [until, interval, 60]}, 1000]}}}},
            {"$unset": "_c"}]
        doc = self._call("rate", lambda: self.flow_times.find_one_and_update(
            {"_id": {"q": self.queue, "n": name}}, pipeline, upsert=True, return_document=ReturnDocument.AFTER),
            idempotent=False)
        granted = int((doc or {}).get("granted") or 0) if doc is not None and doc.get("grant") == nonce else 0
        decided = (doc or {}).get("decided")
        return (granted, float((doc or {}).get("when") or 0.0), (name, nonce),
                float(decided) if isinstance(decided, (int, float)) else self.now())

    def _ungrant(self, grants: list[tuple[str, str]], back: float | None = None) -> None:
        """Give back starts charged for records that were then not taken (all of each grant, or
        ``back`` seconds of the rate's time: the starts of a grant not used), unless another start
        was charged since (then the rate stays charged: fewer starts than allowed, never more)."""
        tat: Any = "$prev" if back is None else {"$subtract": ["$tat", back]}
        for name, nonce in grants:
            self._call("rate", partial(
                self.flow_times.update_one, {"_id": {"q": self.queue, "n": name}, "grant": nonce},
                [{"$set": {"tat": tat, "grant": None}}]))

    def rate_times(self, names: Sequence[str]) -> dict[str, float]:
        now = self.now()
        docs = self._call("rate times", lambda: list(self.flow_times.find(
            {"_id": {"$in": [{"q": self.queue, "n": name} for name in names]}})))
        found = {}
        for doc in docs:
            tat = doc.get("tat")
            if isinstance(tat, (int, float)) and tat > now:
                found[doc["_id"]["n"]] = float(tat)
        return found

    def claim_filter(self, route: str, worker_id: str) -> dict[str, Any]:
        """Due by the server's clock; the estimate only bounds the index range.

        ``$$NOW`` has whole milliseconds and ``due`` microseconds: a record due
        within the server's current millisecond counts as due, or a job fired
        "now" could not be claimed until the next millisecond.
        """
        return {**self._claimable([route], worker_id), "due": {"$lte": self.now() + CLOCK_SLACK},
                "$expr": {"$lt": ["$due", {"$add": [NOW, 0.001]}]}}

    def renew(self, worker_id: str, leases: Sequence[tuple[str, int]], lease: float) -> dict[str, str]:
        statuses: dict[str, str] = {}
        held: dict[str, Any] = {}  # a record a transaction holds: neither renewed nor lost (see LOCK_WAIT_MS)

        def renew_one(job_id: str, token: int) -> Any:
            try:
                return self.jobs.find_one_and_update(
                    {"_id": job_id, "queue": self.queue, "state": RUNNING, "token": token, "owner": worker_id,
                     "slot_lost": {"$ne": True}},
                    [{"$set": {"lease_until": {"$add": [NOW, lease]}}}], projection={"kill_requested": 1},
                    **self._lock_wait)
            except OperationFailure as exc:
                if exc.code != MAX_TIME_EXPIRED:
                    raise
                return held

        for job_id, token in leases:
            doc = self._call("renew", partial(renew_one, job_id, token))
            if doc is held:
                log.warning("job %s: its lease was not renewed: a transaction holds the record", job_id)
                continue
            if doc is None:
                statuses[job_id] = LEASE_LOST
            else:
                statuses[job_id] = LEASE_KILL if doc.get("kill_requested") else LEASE_OK
        return statuses

    def finish(self, job_id: str, token: int, outcome: Outcome, *, expect: str = RUNNING) -> bool:
        # Outcome.apply_to's field rules as one pipeline update (tests compare the two), with the
        # server's clock for "now", and one more rule: a record whose kill was requested never
        # goes back to pending; it ends killed instead.
        moved = self._shift()
        # The flow slots go with the lease, in this update (one document: atomic on a standalone too).
        fields: dict[str, Any] = {"state": outcome.state, "owner": None, "lease_until": None,
                                  "kill_requested": False, "dead": outcome.dead, "error": _lit(outcome.error),
                                  **SLOTS_GONE}
        if outcome.attempts is not None:
            fields["attempts"] = outcome.attempts
        if outcome.state == PENDING:
            due = NOW if outcome.due is None else outcome.due + (0.0 if outcome.due_from_store else moved)
            fields.update(due=due, result=None, finished=None, expire_at="$$REMOVE")
            killed = {"state": KILLED, "dead": False, "error": _lit(KILLED_BY_REQUEST),
                      "attempts": "$attempts" if outcome.attempts is None else outcome.attempts,
                      "due": "$due", "finished": NOW, "expire_at": _expire_at(NOW, self._ttl())}
            asked = {"$eq": ["$kill_requested", True]}
            for name, value in killed.items():
                fields[name] = {"$cond": [asked, value, fields.get(name, "$" + name)]}
        else:
            finished = NOW if outcome.finished is None else outcome.finished + moved
            fields.update(result=_lit(outcome.result), finished=finished,
                          expire_at=_expire_at(finished, self._ttl()))
        if outcome.attempt is not None:
            # The ended attempt's entry, stamped with the server's clock, on the end of the history,
            # of which the last HISTORY_LIMIT stay (every right-hand side reads the record as it was).
            entry = {"$mergeObjects": [_lit(outcome.attempt), {"finished": NOW}]}
            longer = {"$concatArrays": [{"$ifNull": ["$history", []]}, [entry]]}
            fields["history"] = {"$slice": [longer, -HISTORY_LIMIT]}
            fields["history_dropped"] = {"$add": [{"$ifNull": ["$history_dropped", 0]}, {"$max": [
                0, {"$subtract": [{"$size": {"$ifNull": ["$history", []]}}, HISTORY_LIMIT - 1]}]}]}
        fence = {"_id": job_id, "queue": self.queue, "state": expect, "token": token}
        if outcome.state != PENDING:
            # Its dependents are counted down next; until that is done the record says so, and
            # housekeeping completes the count-down if this process dies first (release_stranded).
            fields["settle_pending"] = _SETTLE_PENDING
            if self.transactions:
                return self._finish_counting(job_id, fence, fields, outcome.state)
        try:
            # The same round trip tells whether the record has dependents to count down: most
            # records have none, and a read and a write more per finish (the settle's find_one and
            # $unset) were half of a plain job's round trips.
            before = self._call("finish", lambda: self.jobs.find_one_and_update(
                fence, [{"$set": fields}], projection={"has_dependents": 1}, **self._lock_wait), idempotent=False)
        except DocumentTooLarge as exc:
            raise PayloadTooLarge(f"The result of job {job_id} is too large for a MongoDB document: {exc}") from None
        if before is None:
            return False
        # A dependent attached after this update finds the record finished and counts it itself.
        if outcome.state != PENDING and before.get("has_dependents"):
            self._settle_finished(job_id, state=outcome.state)
        return True

    def _finish_counting(self, job_id: str, fence: dict[str, Any], fields: dict[str, Any], state: str) -> bool:
        """A replica set's (or mongos's) final finish: with dependents, one transaction with their count-down.

        A record without dependents (nearly all) keeps the one round trip: the fenced update also
        requires ``has_dependents`` unset. When it matches nothing, the record is stale, gone, or
        has dependents (a record that had them when this store claimed it skips that update); then
        one transaction counts its dependents down and releases or ends them
        (``_settle_finished`` through the session), and writes the finish last, fenced (a record
        that left the fence aborts the transaction: nothing written, nothing counted). So the
        parent is finished and counted together or not at all, and no mark
        (``settle_pending``) is needed. Written last, because a worker SIGKILLed inside a
        transaction leaves it open on the server, holding what it wrote until MongoDB aborts it
        (``transactionLifetimeLimitSeconds``, 60 s by default): meanwhile the pool's or
        housekeeping's hand-back of that parent would wait. The parent's document is held only
        between its write and the commit.

        Every count writes the dependent's ``waits`` document, so two parents counting one
        dependent at once are a write conflict, and the later one runs again and sees the other's
        count (no write skew); a parent changed since the read (a new dependent, a hand-back) is
        a write conflict too. ``with_transaction`` repeats the whole of it after a transient
        error (those conflicts, an election) and only the commit when its result is unknown; a
        finish repeated after a commit that did apply (the worker's ``_finish_when_back``) finds
        the token fenced off and counts nothing. A stale finish costs a transaction that aborts.
        """
        if job_id in self._claimed_parents:
            self._claimed_parents.discard(job_id)  # had dependents when claimed: it has them still
        else:
            plain = {**fence, "has_dependents": {"$ne": True}}
            try:
                done = self._call("finish", lambda: self.jobs.find_one_and_update(
                    plain, [{"$set": fields}], projection={"_id": 1}, **self._lock_wait), idempotent=False)
            except DocumentTooLarge as exc:
                raise PayloadTooLarge(f"The result of job {job_id} is too large for a MongoDB document: "
                                      f"{exc}") from None
            if done is not None:
                return True
        last = {name: value for name, value in fields.items() if name != "settle_pending"}

        def body(session: ClientSession) -> bool:
            # Counted first, under the snapshot of this first read; the fenced write of the record
            # last. A record that left the fence (stale, gone) aborts it all, counts included.
            self._settle_finished(job_id, state=state, via=self._via(session), unmark=False)
            if self.jobs.find_one_and_update(fence, [{"$set": last}], projection={"_id": 1},
                                             session=session) is None:
                raise _Stale
            return True

        def run() -> bool:
            with self.client.start_session(causal_consistency=False) as session:
                return bool(session.with_transaction(body))

        try:
            return self._call("finish", run, idempotent=False)
        except _Stale:
            return False
        except DocumentTooLarge as exc:
            raise PayloadTooLarge(f"The result of job {job_id} is too large for a MongoDB document: {exc}") from None

    # -- workflows (see the Persistence docstring) ----------------------------------------
    #
    # One small document per edge and per count, so a parent's count costs the same whatever the
    # fan-in. On a replica set (or mongos) a parent's finish and this count-down are one
    # transaction (_finish_counting). On a standalone, which has no multi-document transactions,
    # the count-down is idempotent step by step instead of atomic with the finish:
    #   deps    {_id: "parent/child"}  who waits for whom (the parent's doc says has_dependents)
    #   settled {_id: "child/parent"}  the SET of a dependent's finished parents (a unique _id:
    #                                  a repeat inserts nothing), with "counted" once its
    #                                  decrement of waits.left is done
    #   waits   {_id: child}           left (a hint: decremented once per counted parent) and need
    # A dependent is released only when its settled set holds all its parents (counted from the
    # set, so a decrement lost or doubled by a crash can delay the check, never pass it early),
    # by an update that matches only a waiting record: once. A finish marks its record
    # settle_pending in its own update; a worker that dies before counting leaves the mark, and
    # housekeeping (release_stranded) counts again. (Inside a transaction the mark is set and
    # cleared before the commit; housekeeping's look finds none.)

    supports_workflows = True

    @property
    def _own(self) -> _Via:
        """The workflow documents through the queue's own client (read each time: tests wrap them)."""
        return _Via(self.jobs, self.deps, self.settled, self.waits, None, self._call)

    def _edge_expiry(self) -> datetime:
        return _date(self.now() + 2 * self.result_ttl + 86400)

    def _attach(self, record: JobRecord, via: _Via | None = None) -> None:
        """Make a stored waiting record a dependent of its parents; count those already finished.

        ``via``: an application's session (see :meth:`enqueue_in`), else the queue's own client.
        """
        at = via or self._own
        parents = dependencies.unique(record.parents or ())
        expire = self._edge_expiry()
        at.call("attach", partial(at.waits.replace_one, {"_id": record.id}, {
            "queue": self.queue, "left": len(parents), "need": len(parents),
            "run": dependencies.runs_anyway(record), "expire_at": expire}, upsert=True, session=at.session))
        mark: dict[str, Any] = {"$set": {"has_dependents": True}}
        if at.session is not None or self.transactions:
            # The mark must change the document even when it is there already: an update that
            # changes nothing writes nothing, and only a write orders this attach against a
            # finish that is a transaction. In the application's transaction: a finish committed
            # since its snapshot becomes a write conflict (read below, the parent would still look
            # running), and a later finish waits for the commit (and sees the dependent then).
            # Through our own client on a replica set: a parent's finishing transaction read its
            # edges at its snapshot, maybe before the edge above, and the read below sees the
            # parent running until that transaction commits; neither would count this dependent.
            # Written, the mark makes that transaction's own (last) write of the parent a write
            # conflict, so it runs again and sees the edge; once the transaction has written the
            # parent, the mark waits for its commit and the read below sees the parent finished.
            mark["$inc"] = {"attach_writes": 1}
        for start in range(0, len(parents), 1000):
            batch = parents[start:start + 1000]
            at.call("attach", partial(at.deps.bulk_write, [UpdateOne(
                {"_id": f"{parent}/{record.id}"},
                {"$set": {"queue": self.queue, "parent": parent, "child": record.id, "expire_at": expire}},
                upsert=True) for parent in batch], ordered=False, session=at.session))
            at.call("attach", partial(at.jobs.update_many, {"_id": {"$in": batch}, "queue": self.queue}, mark,
                                      session=at.session))
        # Read after marking: a parent that finished before it had this dependent is counted here;
        # one that finishes later counts it itself (both counting is harmless).
        found: dict[str, Any] = {}
        for start in range(0, len(parents), 1000):
            query = {"_id": {"$in": parents[start:start + 1000]}, "queue": self.queue, **_not_expired(self.now())}
            found.update((doc["_id"], doc.get("state")) for doc in at.call(
                "attach", partial(self._find_all, at.jobs, query, {"state": 1}, at.session)))
        for parent in parents:
            state = found.get(parent, dependencies.missing_parent_state())
            if state in FINISHED_STATES:
                for ended in self._settle(parent, str(state), [record.id], via=at):
                    self._settle_finished(ended, via=at)

    def _settle_finished(self, job_id: str, repair: bool = False, state: str | None = None, *,
                         via: _Via | None = None, unmark: bool = True) -> None:
        """Count a finished record for its dependents, then clear its mark; those it ends count in turn.

        ``repair`` (housekeeping, after a worker died part-way): also make every later count of each
        dependent look at its set, since the dead worker may have counted a parent into the set
        without decrementing the hint. ``state``: the finish that just ended ``job_id`` so, with
        dependents, says it (no read of the record). ``via``: as in :meth:`_attach`. ``unmark``:
        False leaves ``job_id``'s own document alone (a transaction that writes it last).
        """
        at = via or self._own
        work: list[tuple[str, str | None]] = [(job_id, state)]
        while work:  # a worklist, not recursion: a chain may be long
            current, known = work.pop()
            if known is None:
                found = self._finished([current], at).get(current)
                if found is None:
                    continue
                known = found[0] if found[1] else None
            if known is not None:
                children = [str(d["child"]) for d in at.call("settle", partial(
                    self._find_all, at.deps, {"parent": current, "queue": self.queue}, {"child": 1}, at.session))]
                work += self._to_count_next(self._settle(current, known, children, repair, via=at), at)
            if unmark or current != job_id:
                at.call("settle", partial(at.jobs.update_one, {"_id": current, "queue": self.queue},
                                          {"$unset": {"settle_pending": ""}}, session=at.session))

    def _to_count_next(self, ended: list[str], at: _Via) -> list[tuple[str, str | None]]:
        """Of the dependents a count just ended, those that have dependents of their own, with their state.

        The others carry no mark (``_SETTLE_PENDING``) and nothing to count: read together, they
        cost one trip per thousand instead of two each.
        """
        return [(job_id, state) for job_id, (state, has_dependents) in self._finished(ended, at).items()
                if has_dependents]

    def _finished(self, ids: list[str], at: _Via) -> dict[str, tuple[str, bool]]:
        """The finished ones of ``ids``: each one's state, and whether it has dependents (a trip per thousand)."""
        found: dict[str, tuple[str, bool]] = {}
        for start in range(0, len(ids), SETTLE_BATCH):
            query = {"_id": {"$in": ids[start:start + SETTLE_BATCH]}, "queue": self.queue}
            for doc in at.call("settle", partial(self._find_all, at.jobs, query, {"state": 1, "has_dependents": 1},
                                                 at.session)):
                if doc.get("state") in FINISHED_STATES:
                    found[str(doc["_id"])] = (str(doc["state"]), bool(doc.get("has_dependents")))
        return found

    def _settle(self, parent: str, state: str, children: list[str], repair: bool = False, *,
                via: _Via | None = None) -> list[str]:
        """Count a finished parent into each dependent's set; release or end the dependents it completes.

        Returns the dependents it ended (their own dependents are counted next). ``via``: as in
        :meth:`_attach`. A thousand dependents at a time, each step one write or read for all of
        them: a fan-out of ten thousand is a few dozen trips, not fifty thousand, and on a replica
        set it fits in the one transaction of the parent's finish well inside MongoDB's
        ``transactionLifetimeLimitSeconds`` (60 s), which one trip per step and dependent did not
        on a loaded machine.
        """
        at = via or self._own
        ended: list[str] = []
        for start in range(0, len(children), SETTLE_BATCH):
            ended += self._settle_some(parent, state, children[start:start + SETTLE_BATCH], repair, at)
        return ended

    def _settle_some(self, parent: str, state: str, children: list[str], repair: bool, at: _Via) -> list[str]:
        """:meth:`_settle` for at most ``SETTLE_BATCH`` dependents."""
        session = at.session
        # In a transaction the set's entry and the decrement commit together or not at all: the
        # entry goes in already counted, and the call that put it in decrements. Step by step (a
        # standalone), "counted" flips in a write of its own, so that a repeat after a crash
        # between the two neither skips the decrement nor doubles it.
        atomic = session is not None and session.in_transaction
        expire = self._edge_expiry()
        marks = {f"{child}/{parent}": child for child in children}
        # Upserts that only insert: a repeat (or a retried write that went in) inserts nothing, and
        # inside an application's transaction a duplicate key would abort it.
        entries = at.call("settle", partial(at.settled.bulk_write, [UpdateOne({"_id": mark}, {"$setOnInsert": {
            "queue": self.queue, "child": child, "parent": parent, "state": state, "counted": atomic,
            "expire_at": expire}}, upsert=True) for mark, child in marks.items()], ordered=False, session=session))
        # Decrement once per parent: only the call that inserted the counted entry, or that flips
        # "counted" (each entry flips in one update only; the flip's nonce says which were this one's).
        if atomic:
            decrement = [marks[str(mark)] for mark in entries.upserted_ids.values()]
        else:
            nonce = uuid.uuid4().hex
            at.call("settle", partial(at.settled.update_many, {"_id": {"$in": list(marks)}, "counted": False},
                                      {"$set": {"counted": True, "flip": nonce}}, session=session))
            decrement = [str(doc["child"]) for doc in at.call("settle", partial(
                self._find_all, at.settled, {"_id": {"$in": list(marks)}, "flip": nonce}, {"child": 1}, session))]
        # A dependent released, or ended, already has no waits document: nothing more to do for it.
        waits = self._count_hints(children, decrement, at)
        kill = [child for child, wait in waits.items() if dependencies.kills_dependent(state, bool(wait.get("run")))]
        killed = set(kill)
        look = {child: int(wait.get("need", 0)) for child, wait in waits.items()
                if child not in killed and (repair or int(wait.get("left", 1)) <= 0)}
        if repair and look:
            # The dead worker may have marked its parent counted without decrementing: the hint
            # is too high, and the last parent would not look at the set. A hint too low only
            # makes more looks, so from now on every parent looks (left stays <= 0), and this
            # looks once more after that: a parent whose decrement came before the $min was
            # in the set before it, and one whose decrement comes after it looks itself.
            # (Writing the hint from a count instead undid a decrement made between the count
            # and the write, and the dependent waited forever.)
            at.call("settle", partial(at.waits.update_many, {"_id": {"$in": list(look)}}, {"$min": {"left": 0}},
                                      session=session))
        if look:
            self._release_complete(look, via=at)
        return self._end_waiting(parent, state, kill, at) if kill else []

    def _count_hints(self, children: list[str], decrement: list[str], at: _Via) -> dict[str, dict[str, Any]]:
        """The waits documents of ``children``, read after the hint of each in ``decrement`` went down by one.

        The decrement is not repeated safely (a multi-document update is no retryable write) and
        need not be: a hint decremented twice only makes a parent look at the set sooner.
        """
        session = at.session
        if len(children) == 1:
            # A chain's step or a group's member: one dependent, one trip (a fan-in of thousands
            # is thousands of these, each a transaction of its own on a replica set).
            [child] = children
            if decrement:
                doc = at.call("settle", partial(at.waits.find_one_and_update, {"_id": child}, {"$inc": {"left": -1}},
                                                return_document=ReturnDocument.AFTER, session=session))
            else:
                doc = at.call("settle", partial(at.waits.find_one, {"_id": child}, session=session))
            return {} if doc is None else {child: doc}
        if decrement:
            at.call("settle", partial(at.waits.update_many, {"_id": {"$in": decrement}}, {"$inc": {"left": -1}},
                                      session=session))
        return {str(doc["_id"]): doc for doc in at.call("settle", partial(
            self._find_all, at.waits, {"_id": {"$in": children}}, None, session))}

    def _end_waiting(self, parent: str, state: str, children: list[str], at: _Via) -> list[str]:
        """End killed those of ``children`` still waiting (their parent ended so); returns them."""
        outcome = dependencies.dependency_failed(parent, state)
        at.call("settle", partial(at.jobs.update_many, self._still_waiting(children), [{"$set": {
            "state": KILLED, "error": _lit(outcome.error), "finished": NOW, "dead": False,
            "expire_at": _expire_at(NOW, self._ttl()), "settle_pending": _SETTLE_PENDING}}], session=at.session))
        at.call("settle", partial(at.waits.delete_many, {"_id": {"$in": children}}, session=at.session))
        # All of them, ended by this update or (released first, then ended by another parent) not:
        # the caller reads each one's state before counting it, and counting one twice is harmless.
        return children

    def _still_waiting(self, ids: list[str]) -> dict[str, Any]:
        """The filter of those of ``ids`` that still wait for their parents (pending, due far ahead)."""
        return {"_id": {"$in": ids}, "queue": self.queue, "state": PENDING, "due": {"$gte": dependencies.WAITING_DUE}}

    def _release_complete(self, need: Mapping[str, int], *, via: _Via | None = None) -> dict[str, int]:
        """Release each dependent whose set holds all ``need[child]`` parents (the count, not the hint, decides).

        Returns how many parents the set of each one not released holds.
        """
        at = via or self._own
        counts: list[dict[str, Any]] = [{"$match": {"child": {"$in": list(need)}}},
                                        {"$group": {"_id": "$child", "n": {"$sum": 1}}}]
        have = {str(doc["_id"]): int(doc["n"]) for doc in at.call(
            "settle", lambda: list(at.settled.aggregate(counts, session=at.session)))}
        complete = [child for child, parents in need.items() if have.get(child, 0) >= parents]
        if complete:
            at.call("settle", partial(at.jobs.update_many, self._still_waiting(complete), [{"$set": {"due": NOW}}],
                                      session=at.session))
            at.call("settle", partial(at.waits.delete_many, {"_id": {"$in": complete}}, session=at.session))
        return {child: have.get(child, 0) for child in need if child not in complete}

    def release_stranded(self, limit: int = 100) -> int:
        query = {"queue": self.queue, "settle_pending": True, "finished": {"$lt": self.now() - SETTLE_GRACE}}
        stranded = self._call("stranded", lambda: list(self.jobs.find(query, {"_id": 1}, limit=limit)))
        for doc in stranded:
            log.warning("job %s finished but its dependents were not all counted (its worker died?): "
                        "counting them now", doc["_id"])
            self._settle_finished(str(doc["_id"]), repair=True)
        return len(stranded)

    def get_many(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        found: dict[str, JobRecord] = {}
        for start in range(0, len(job_ids), 1000):
            batch = list(job_ids[start:start + 1000])
            query = {"_id": {"$in": batch}, "queue": self.queue, **_not_expired(self.now())}
            for doc in self._call("get", partial(self._find_all, self.jobs, query)):
                found[str(doc["_id"])] = _to_record(doc)
        return [found.get(job_id) for job_id in job_ids]

    @staticmethod
    def _find_all(collection: Collection[dict[str, Any]], query: dict[str, Any],
                  projection: dict[str, Any] | None = None,
                  session: ClientSession | None = None) -> list[dict[str, Any]]:
        return list(collection.find(query, projection, session=session))

    def dependents(self, job_id: str) -> list[str]:
        found = self._call("dependents", partial(self._find_all, self.deps, {"parent": job_id, "queue": self.queue},
                                                 {"child": 1}))
        return sorted(str(d["child"]) for d in found)

    def _ttl(self) -> dict[str, Any]:
        """The record's own result_ttl, else this backend's default (as a pipeline expression)."""
        return {"$ifNull": ["$result_ttl", self.result_ttl]}

    def expired_leases(self, now: float, limit: int = 100) -> list[JobRecord]:
        # ``now`` is the caller's clock; the server's decides when a lease ran out.
        self._check_indexes()
        query = {"queue": self.queue, "state": RUNNING, "lease_until": {"$lt": self.now() + CLOCK_SLACK},
                 "$expr": {"$lt": ["$lease_until", NOW]}}
        docs = self._call("expired leases", lambda: list(self.jobs.find(query, limit=limit)))
        records = []
        for doc in docs:
            try:
                records.append(_to_record(doc))
            except MalformedRecord:
                continue
        return records

    def register_worker(self, info: WorkerInfo) -> None:
        doc = {**info.to_dict(), "_id": info.id, "queue": self.queue}
        # Readers compare last_seen with the server's clock: a skewed worker's stamps are moved onto it.
        moved = self._shift()
        doc["started"] += moved
        doc["last_seen"] += moved
        self._call("register worker", lambda: self.worker_docs.replace_one({"_id": info.id}, doc, upsert=True))

    def heartbeat(self, worker_id: str, state: str) -> bool:
        result = self._call("heartbeat", lambda: self.worker_docs.update_one(
            {"_id": worker_id, "queue": self.queue}, [{"$set": {"state": _lit(state), "last_seen": NOW}}]))
        return result.matched_count == 1

    def unregister_worker(self, worker_id: str) -> None:
        self._call("unregister worker", lambda: self.worker_docs.delete_one({"_id": worker_id, "queue": self.queue}))

    def workers(self) -> list[WorkerInfo]:
        docs = self._call("workers", lambda: list(self.worker_docs.find({"queue": self.queue}, sort=[("_id", 1)])))
        found = []
        for doc in docs:
            try:
                found.append(WorkerInfo.from_dict(doc))
            except (TypeError, ValueError):
                continue
        return found

    # -- settings ------------------------------------------------------------------

    def _setting_id(self, name: str) -> dict[str, str]:
        return {"q": self.queue, "n": name}

    def get_setting(self, name: str) -> str | None:
        doc = self._call("get setting", lambda: self.settings.find_one({"_id": self._setting_id(name)}))
        value = None if doc is None else doc.get("value")
        return value if isinstance(value, str) else None

    def put_setting(self, name: str, value: str | None) -> None:
        route = flow.route_of_setting(name)
        if route is not None:
            self._flows.pop(route, None)
        if value is None:
            self._call("put setting", lambda: self.settings.delete_one({"_id": self._setting_id(name)}))
        else:
            self._call("put setting", lambda: self.settings.replace_one(
                {"_id": self._setting_id(name)}, {"_id": self._setting_id(name), "value": value}, upsert=True))

    # -- throughput counters -----------------------------------------------------------

    def add_stats(self, samples: Sequence[RouteMinute]) -> None:
        oldest = int((time.time() - RETENTION) // 60)
        updates = []
        for sample in samples:
            if sample.minute < oldest or not sample.counts:
                continue
            inc = {}
            for counter, value in sample.counts.items():
                if not counter or "." in counter or counter.startswith("$"):
                    raise ValueError(f"a counter name cannot be a MongoDB field name: {counter!r}")
                inc[f"counts.{counter}"] = int(value)
            # The minute's TTL counts from its end, so a chart of the last hour never loses one.
            expire_at = _date((sample.minute + 1) * 60 + RETENTION)
            updates.append(UpdateOne(
                {"_id": {"q": self.queue, "r": sample.route, "m": sample.minute}},
                {"$inc": inc, "$setOnInsert": {"queue": self.queue, "route": sample.route,
                                               "minute": sample.minute, "expire_at": expire_at}},
                upsert=True))
        if updates:
            # $inc is atomic per document; concurrent upserts of one _id are retried by the server.
            # Not idempotent: a write that may have been applied is not repeated here (retryable
            # writes cover it on a replica set).
            self._call("add stats", lambda: self.stats_docs.bulk_write(updates, ordered=False), idempotent=False)

    def stats(self, since_minute: int) -> list[RouteMinute]:
        docs = self._call("stats", lambda: list(self.stats_docs.find(
            {"queue": self.queue, "minute": {"$gte": since_minute}}, sort=[("minute", ASCENDING)])))
        found = []
        for doc in docs:
            counts = doc.get("counts")
            if not isinstance(doc.get("route"), str) or not isinstance(doc.get("minute"), int) \
                    or not isinstance(counts, Mapping):
                continue  # not ours
            found.append(RouteMinute(doc["route"], doc["minute"],
                                     {str(k): int(v) for k, v in counts.items() if isinstance(v, int)}))
        return found

    # -- waiting -------------------------------------------------------------------

    def _next_due(self, routes: Sequence[str], worker_id: str, session: ClientSession | None = None) -> float | None:
        jobs = self.jobs if session is None else self.jobs.with_options(read_concern=ReadConcern("majority"))
        doc = jobs.find_one(self._claimable(routes, worker_id), {"due": 1}, sort=[("due", ASCENDING)],
                            session=session)
        due = None if doc is None else doc.get("due")
        return float(due) if isinstance(due, (int, float)) else None

    def wait_for_work(self, route: str, worker_id: str, timeout: float, idle: float = 0.0) -> None:
        deadline = time.monotonic() + max(timeout, 0.0)
        if route in self._held_back:
            # The due records were left behind by a limit or a pause: no reason to return at once.
            # Wait for the time the claim said one may be claimable, for a finish (which may free
            # a slot) or new work on a change stream, or HELD_POLL on a standalone.
            at = self._held_back[route]
            if at is not None:
                deadline = min(deadline, time.monotonic() + max(at - self.now(), 0.0))
            if self.notifies:
                self._call("wait for work", lambda: self._wait_on_stream([route], worker_id, deadline, held=True),
                           idempotent=False)
            else:
                time.sleep(max(0.0, min(deadline - time.monotonic(), HELD_POLL)))
            return
        if self.notifies:
            self._call("wait for work", lambda: self._wait_on_stream([route], worker_id, deadline),
                       idempotent=False)
        else:
            self._call("wait for work", lambda: self._poll([route], worker_id, deadline, idle), idempotent=False)

    def _poll(self, routes: Sequence[str], worker_id: str, deadline: float, idle: float) -> None:
        # The base class's back-off, but returning as soon as the indexed look finds a due record.
        pause = min(max(idle, 0.001), self.max_idle_poll)
        while True:
            due = self._next_due(routes, worker_id)
            left = deadline - time.monotonic()
            until_due = None if due is None else due - self.now()
            if left <= 0 or (until_due is not None and until_due <= 0) or self.stop_waiting:
                return  # stop_waiting: the worker is stopping, and a signal does not end this loop
            time.sleep(min(pause, left, until_due if until_due is not None else left))
            pause = min(pause * 2, self.max_idle_poll)

    def _wait_on_stream(self, routes: Sequence[str], worker_id: str, deadline: float, held: bool = False) -> None:
        # A fresh stream per wait, started just after the snapshot of the read
        # that found nothing due: whatever is written after it is in the stream,
        # whatever was written before it was seen by the read. A majority read
        # is what makes its operation time that snapshot's exact timestamp, so
        # starting one tick later neither misses a write nor replays the last
        # one (which would spin the worker). No backlog of stale events either.
        with self.client.start_session(causal_consistency=False) as session:
            due = None if held else self._next_due(routes, worker_id, session)
            if held:  # the snapshot to start the stream after; its due records are held back
                self.jobs.with_options(read_concern=ReadConcern("majority")).find_one(
                    {"_id": None}, {"_id": 1}, session=session)
            read_at = session.operation_time
            if due is not None:
                until_due = due - self.now()
                if until_due <= 0:
                    return
                deadline = min(deadline, time.monotonic() + until_due)
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                return
            pipeline = [{"$match": {"$or": [
                {"operationType": {"$in": ["insert", "replace"]}, "fullDocument.queue": self.queue,
                 "fullDocument.route": {"$in": list(routes)}, "fullDocument.state": PENDING,
                 "fullDocument.target": {"$in": [None, worker_id]}},
                # A retry or release turns a record back to pending; an update
                # event does not say which queue, so these wakes may be spurious.
                {"operationType": "update", "updateDescription.updatedFields.state": PENDING},
                # Held back by a limit: a finish may free a slot (spurious wakes cost one claim).
                *([{"operationType": "update",
                    "updateDescription.updatedFields.state": {"$in": list(FINISHED_STATES)}}] if held else []),
            ]}}]
            start = None if read_at is None else Timestamp(read_at.time, read_at.inc + 1)
            with self.jobs.watch(pipeline, max_await_time_ms=left_ms, start_at_operation_time=start,
                                 session=session) as stream:
                while time.monotonic() < deadline:
                    if stream.try_next() is not None:
                        return

    def close(self) -> None:
        self.close_async_clients()
        try:
            self.client.close()
        except PyMongoError as exc:
            log.debug("mongodb %s: error while closing: %s", self.address, self._scrub(exc))
