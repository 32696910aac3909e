"""The FoundationDB backend: the Persistence protocol as FoundationDB transactions.

Every protocol step is one transaction (retried as ``@fdb.transactional``
retries, see ``_once``), so it is atomic and serializable, and FoundationDB's optimistic concurrency does the locking:
two workers claiming the same record both read it, and the second commit is
rejected (1020) and retried on fresh data. Keys are tuple-encoded under
``Subspace((db, queue))``::

    ("job", id, "meta")          JSON of the record without payload and result
    ("job", id, "payload", n)    the payload, in chunks below the 100 kB value limit
    ("job", id, "result", n)     the result, likewise
    ("job", id, "slot")          a pending record's key in the due index
    ("due", route, target, due, versionstamp, id)   claimable records, in claim order
    ("pdue", route, -priority, due, versionstamp, id)  shared ones of a priority other than 0
    ("pdue", route, -priority, target, due, versionstamp, id)  a worker's broadcasts of one (strings
                                 sort before floats: each level holds its broadcasts, then its shared)
    ("kslot", limit_key, id)     flow: a running record of a limited key -> its lease_until
    ("rslot", route, id)         flow: every running record of the route -> its lease_until
    ("rate", name)               flow: a GCRA time (skunkqueue.flow.key_tat/route_tat names)
    ("lease", lease_until, id)   running records, oldest lease first
    ("expire", expire_at, id)    finished records, deleted after result_ttl
    ("count", route, state)      record counts (atomic adds: no conflicts)
    ("idle", route, worker)      an idle worker waiting on route, until which version (tuple-packed)
    ("nudge", worker)            a counter the idle worker watches; producers bump it
    ("worker", id)               the worker registry (JSON)
    ("applied", created, nonce)  a step's marker: written with the step, read on retry
    ("deps", parent, child), ("settled", child, parent), ("waits", child)   workflows (see _settle)
    ("settling", parent)         a finished step whose dependents are not all counted down yet

A commit can fail with commit_unknown_result (1021), or time out (1031),
after it applied. FoundationDB's advice is to make transactions idempotent.
Renew, request_kill, heartbeat and housekeeping are (doing them again
changes nothing). Enqueue, claim, finish and purge are not, so each call is
given a marker key, made outside the retry loop, written in the same
transaction and read (with a conflict range on it) by every retry: if the
marker is there, the step applied and its stored outcome is returned instead
of doing it twice. The first attempt adds the conflict range without
reading, so two attempts of a step can never both commit. A 1031 raised at
commit is retried the same way (@fdb.transactional would give up on it).
Markers are deleted by housekeeping after ``APPLIED_KEEP`` seconds, far
longer than any retry loop lasts.

Idle workers are woken one by one, not all at once: an idle worker writes
its ``idle`` entry and watches its own ``nudge`` key; a producer reads the
route's idle entries, and for each job it adds takes one live entry away and
nudges that worker. The worker's look at the due index and the producer's
look at the idle entries are both conflicting reads, so whichever commits
second is retried and sees the other: a job cannot slip in unnoticed while a
worker goes idle.

Claims spread over the due index when they conflict: each claim reads a
window of due entries with a snapshot read, picks its records at random from
it and reads only those records with conflicting reads, so two claimers
conflict only if they pick the same record. The window is ``limit`` (strict
order) while claims do not conflict and widens as they do.

The due index ends in a versionstamp: ties between equal due times go in
commit order (within one enqueue, in the order given) without a shared
counter that every producer would conflict on. Its exact key is only known
after commit, so it is also written into the record's ``slot`` with
``set_versionstamped_value``.

Flow control (the Persistence docstring's rules) lives in the claim's
transaction: priorities by reading ``pdue`` level by level around the
``due`` index (priority 0), each level's shared records merged with the
claiming worker's broadcasts, a key's slots and a route's as
conflicting reads of ``kslot``/``rslot`` (two claimers racing for the last
slot conflict, and the retry sees the winner), GCRA times read and written
in it. A slot is a running record's entry with its lease: renew rewrites it,
finish and hand-back clear it with the record, and it stops counting when
the lease runs out. The stand-in's "now" is this host's clock, as elsewhere.
"""


from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import json
import logging
import math
import random
import threading
import time
import uuid
import weakref
from typing import Any, Callable, Iterator, Sequence, TypeVar

import fdb
import fdb.tuple

from skunkqueue import dependencies, flow, policy
from skunkqueue.errors import BackendUnavailable, ConfigurationError, MalformedRecord, PayloadTooLarge
from skunkqueue.metrics import RETENTION, RouteMinute
from skunkqueue.persistence import LEASE_KILL, LEASE_LOST, LEASE_OK, Persistence, refuse_names_over
from skunkqueue.record import ERROR, FINISHED_STATES, PENDING, RUNNING, STATES, JobRecord, Outcome, WorkerInfo

API_VERSION = 710
log = logging.getLogger("skunkqueue.fdb")

# FoundationDB refuses values over 100 kB; blobs are split below that.
CHUNK = 90_000
# FoundationDB refuses transactions over 10 MB (and advises staying under 1 MB).
TRANSACTION_BUDGET = 9_000_000
# Records per transaction when a workflow too large for one is stored in several.
WORKFLOW_BATCH = 1000
# Dependents a finished step counts down per transaction: each costs about 1.8 kB of the 10 MB
# (5,000 took 8.96 MB) and four reads sent together; each it ends, a range read of its own
# dependents waited for in turn (a millisecond on a cluster). The rest go in further transactions.
SETTLE_BUDGET = 1000
# A count-down left part-way (its finisher died) is carried on by housekeeping after this long.
SETTLE_STALE = 10.0
# A transaction that cannot commit within this time (cluster down, endless
# conflicts) fails with 1031 instead of retrying forever.
DEFAULT_TIMEOUT_MS = 10_000
# Finished records deleted per housekeeping call: keeps that transaction small.
EXPIRE_BATCH = 100
MAX_NAME_BYTES = 2048  # per name: a due key holds the queue, route and target (10 kB key limit)
_COUNTER_ONE = (1).to_bytes(8, "little", signed=True)
_COUNTER_MINUS_ONE = (-1).to_bytes(8, "little", signed=True)
_SIZE_ERRORS = {2101, 2102, 2103}  # transaction_too_large, key_too_large, value_too_large
# Commits that time out (1031) and may have applied are retried this many times,
# each with a fresh timeout; a timeout before commit (cluster unreachable) is not.
UNKNOWN_TIMEOUT_RETRIES = 3
# Markers outlive any retry loop (bounded by the transaction timeout) by far;
# a housekeeper whose clock runs this much ahead could delete one too early.
APPLIED_KEEP = 300.0
# An idle worker's entry is deleted this long after it lapsed (a live worker renews it every wait).
IDLE_KEEP = 60.0
# FoundationDB's versions advance about a million a second: idle entries are timed in them.
VERSIONS_PER_SECOND = 1_000_000
# clock_offsets compares this host's clock only with peers' stamps made this recently (seconds, in versions).
CLOCK_STAMP_FRESH = 5.0
# How wide a claim's window may grow, in records per claimed record.
CLAIM_SPREAD_MAX = 512
# list_jobs pages: rows per transaction adapt so that a page stays near this many bytes.
SCAN_PAGE_BYTES = 1_000_000
# A watch that fires with an error or without a change: wait this long, doubling, before the next.
WATCH_BACKOFF = (0.05, 1.0)

_T = TypeVar("_T")


def _translate(method: Callable[..., _T]) -> Callable[..., _T]:
    """Turn FoundationDB errors into the core's errors, without a deep traceback."""

    @functools.wraps(method)
    def wrapper(self: FDBPersistence, *args: Any, **kwargs: Any) -> _T:
        try:
            return method(self, *args, **kwargs)
        except fdb.FDBError as exc:
            if exc.code in _SIZE_ERRORS:
                raise PayloadTooLarge(
                    f"FoundationDB refused to store this: {exc.description} (error {exc.code}). "
                    "Values are limited to 100 kB and transactions to 10 MB."
                ) from None
            raise BackendUnavailable(
                f"FoundationDB ({self.where}) failed: {exc.description} (error {exc.code})"
            ) from None

    return wrapper


def cluster_file(url: str | None) -> str | None:
    """The cluster file an address names: ``fdb:///PATH`` or ``PATH``; ``fdb://`` is the client's default."""
    if url is not None and url[:6].lower() == "fdb://":
        return url[6:] or None
    return url


def _open_database(cluster_file: str | None) -> Any:
    try:
        if not fdb.is_api_version_selected():
            fdb.api_version(API_VERSION)
    except Exception as exc:  # the bindings raise a bare Exception when libfdb_c is missing
        if "shared library" in str(exc):
            raise BackendUnavailable(
                "FoundationDB client library not found: install the FoundationDB client package "
                "(libfdb_c, from https://github.com/apple/foundationdb/releases) on this machine."
            ) from None
        raise BackendUnavailable(f"Cannot load the FoundationDB client: {exc}") from None
    try:
        return fdb.open(cluster_file)
    except fdb.FDBError as exc:
        raise BackendUnavailable(
            f"Cannot open the FoundationDB cluster file {cluster_file or '(default)'}: {exc}"
        ) from None


def _chunks(blob: bytes) -> list[bytes]:
    return [blob[i:i + CHUNK] for i in range(0, len(blob), CHUNK)]


class _Stored:
    """A record's keys as read in one transaction; decoding happens on demand."""

    def __init__(self, job_id: str) -> None:
        self.id = job_id
        self.raw_meta: bytes | None = None
        self.payload: list[bytes] = []
        self.result: list[bytes] = []
        self.links: list[bytes] = []  # a workflow step's parents and inputs, as JSON in chunks
        self.slot: bytes | None = None

    def add(self, part: tuple[Any, ...], value: bytes) -> None:
        """Take in one of the record's keys (``part`` follows the id in the key)."""
        if part == ("meta",):
            self.raw_meta = value
        elif part[:1] == ("payload",):
            self.payload.append(value)
        elif part[:1] == ("result",):
            self.result.append(value)
        elif part[:1] == ("links",):
            self.links.append(value)
        elif part == ("slot",):
            self.slot = value

    def meta(self) -> dict[str, Any] | None:
        """The stored fields, or None if they are not a JSON object."""
        try:
            data = json.loads(self.raw_meta) if self.raw_meta is not None else None
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def record(self, *, fields_only: bool = False) -> JobRecord:
        """The record; ``fields_only``: from its fields alone (read without chunks), with an empty
        payload and no result, parents or inputs, so it must not be written with its payload."""
        data = self.meta()
        if data is None:
            raise MalformedRecord(f"record {self.id!r} has no readable JSON fields")
        data = dict(data)
        if fields_only:
            data["payload"], data["result"] = b"", None
            return JobRecord.from_dict(data)
        if data.get("payload") != len(self.payload) or data.get("result") not in (None, len(self.result)):
            raise MalformedRecord(f"record {self.id!r} has missing or extra payload/result chunks")
        data["payload"] = b"".join(self.payload)
        data["result"] = None if data.get("result") is None else b"".join(self.result)
        if self.links:
            try:
                data.update(json.loads(b"".join(self.links)))
            except ValueError:
                raise MalformedRecord(f"record {self.id!r} has unreadable parents") from None
        return JobRecord.from_dict(data)



@dataclasses.dataclass
class _InTransaction:
    """What one queue stored in one read version of an application's transaction (``using=``)."""

    version: int
    # Its keys, to their holders: a key stored earlier in the transaction is unreadable there (1036).
    keys: dict[str, str] = dataclasses.field(default_factory=dict)
    # Its records, by id: their keys are versionstamped, unreadable there too, and ``after=`` looks.
    records: dict[str, JobRecord] = dataclasses.field(default_factory=dict)

class FDBPersistence(Persistence):
    """A queue stored in FoundationDB. ``url`` is the cluster file, ``db`` the root name."""

    name = "fdb"
    url_schemes = ("fdb",)
    # Payloads are split into chunks; 1 MB keeps a batch of them well inside a transaction.
    max_payload = 1_000_000
    notifies = True

    @classmethod
    def check_names(cls, queue: str, routes: Sequence[str] = ()) -> None:
        # Keys hold the queue, route and target names, and FoundationDB keys stop at 10,000 bytes.
        refuse_names_over(MAX_NAME_BYTES, cls.name, queue, routes)

    @classmethod
    def takes_url(cls, url: str) -> bool:
        # fdb:///path/to/fdb.cluster, fdb:// (the client's default), or the cluster file's path itself.
        return super().takes_url(url) or ("://" not in url and url.endswith(".cluster"))

    def __init__(self, queue: str, *, url: str | None = None, db: str | None = None,
                 **options: Any) -> None:
        timeout_ms = int(options.pop("timeout_ms", DEFAULT_TIMEOUT_MS))
        super().__init__(queue, url=url, db=db, **options)
        url = cluster_file(url)
        self.where = f"cluster file {url or '(default)'}"
        self.db = db or "skunkqueue"
        self._db = _open_database(url)
        self._db.options.set_transaction_timeout(timeout_ms)
        self.space = fdb.Subspace((self.db, queue))
        self._jobs = self.space["job"]
        self._due = self.space["due"]
        self._pdue = self.space["pdue"]
        self._kslot = self.space["kslot"]
        self._rslot = self.space["rslot"]
        self._rate = self.space["rate"]
        self._lease = self.space["lease"]
        self._expire = self.space["expire"]
        self._count = self.space["count"]
        self._idle = self.space["idle"]
        self._nudge = self.space["nudge"]
        self._workers = self.space["worker"]
        self._applied = self.space["applied"]
        self._keys = self.space["key"]          # idempotency key -> the id of the record holding it
        self._settings = self.space["setting"]
        self._stats = self.space["stats"]       # (minute, route, counter) -> little-endian int64, atomic adds
        self._clocks = self.space["clock"]      # worker id -> (its host's time.time(), the read version then)
        # Workflows (see the Persistence docstring): parent -> its dependents; a waiting record's set
        # of finished parents (child, parent) -> how it ended; and what it still waits for.
        self._deps = self.space["deps"]         # (parent, child) -> b""
        self._settled = self.space["settled"]   # (child, parent) -> state
        self._waits = self.space["waits"]       # (child,) -> {"left": n, "run": bool}
        # A finished parent whose dependents are not all counted yet (see _settle).
        self._settling = self.space["settling"]  # (parent,) -> {"state", "after": child, "at": time}
        # Per route: how many candidates per claimed record the next claim reads (1: strict order).
        self._spread: dict[str, float] = {}
        self._watch_backoff = 0.0
        # Per route whose last claim here left due records behind for a limit or a pause: when
        # one of them may be claimable (None: when a finish or a setting nudges, or on a timeout).
        self._held_back: dict[str, float | None] = {}
        # Per route: (when read, monotonic; paused; its limit), reused for flow.SETTINGS_TTL seconds.
        self._flows: dict[str, tuple[float, bool, flow.RouteLimit | None]] = {}
        self._checked_database: Any = None  # using=: a database object known to be the queue's cluster
        # using=: what this queue stored in an application's transaction so far, by its read version
        # (a reset or committed transaction object gets a new one, and starts afresh).
        self._in_transaction: weakref.WeakKeyDictionary[Any, _InTransaction] = weakref.WeakKeyDictionary()

    # -- one protocol step, applied once however its commit fails ----------------------------

    def _once(self, step: Callable[[Any], tuple[_T, Any]], replay: Callable[[Any, Any], _T] | None,
              attempts: list[int] | None = None) -> _T:
        """Run ``step(tr) -> (result, memo)`` so that it applies at most once.

        ``replay(tr, memo)`` answers a retry whose earlier attempt did apply.
        Without ``replay`` the step is idempotent by itself (running it again
        changes nothing): no marker is written, only the retries are made.
        @fdb.transactional would retry 1021 but give up on a 1031 raised during
        commit, leaving the caller unsure; this loop also retries that (a few
        times, each with a fresh timeout), and the marker tells whether it applied.
        """
        marker = self._applied.pack((time.time(), uuid.uuid4().hex))
        tries = attempts if attempts is not None else [0]
        tr = self._db.create_transaction()
        timeouts = 0
        while True:
            committing = False
            try:
                tries[0] += 1
                if replay is not None:
                    tr.add_read_conflict_key(marker)
                    if tries[0] > 1:
                        prior = tr[marker]
                        if prior.present():
                            return replay(tr, json.loads(bytes(prior)))
                result, memo = step(tr)
                if replay is not None:
                    tr[marker] = json.dumps(memo, separators=(",", ":")).encode()
                # Have the read version before committing (free when the step read anything):
                # an unreachable cluster then times out here, where nothing can have applied.
                tr.get_read_version().wait()
                committing = True
                tr.commit().wait()
                return result
            except fdb.FDBError as exc:
                if exc.code == 1031 and committing and timeouts < UNKNOWN_TIMEOUT_RETRIES:
                    timeouts += 1
                    tr = self._db.create_transaction()  # with the database's timeout, from now
                    continue
                tr.on_error(exc).wait()  # raises what cannot be retried

    # -- reading and writing one record (inside a transaction) ----------------------------

    def _read(self, tr: Any, job_id: str) -> _Stored | None:
        stored = _Stored(job_id)
        span = self._jobs.range((job_id,))
        for kv in tr.get_range(span.start, span.stop):
            stored.add(self._jobs.unpack(kv.key)[1:], kv.value)
        return None if stored.raw_meta is None and not stored.payload else stored

    def _read_meta(self, tr: Any, job_id: str) -> _Stored | None:
        """A record's fields and due-index slot, without payload or result chunks."""
        return self._read_metas(tr, [job_id])[job_id]

    def _read_metas(self, tr: Any, job_ids: Sequence[str]) -> dict[str, _Stored | None]:
        """``_read_meta`` of several records, every read sent before the first answer is waited
        for: thousands cost about one round trip, not thousands (the five-second read window)."""
        sent = [(job_id, tr[self._jobs.pack((job_id, "meta"))], tr[self._jobs.pack((job_id, "slot"))])
                for job_id in job_ids]
        found: dict[str, _Stored | None] = {}
        for job_id, meta, slot in sent:
            stored = _Stored(job_id)
            stored.raw_meta = bytes(meta) if meta.present() else None
            stored.slot = bytes(slot) if slot.present() else None
            found[job_id] = None if stored.raw_meta is None and stored.slot is None else stored
        return found

    def _unindex(self, tr: Any, stored: _Stored) -> None:
        """Take a record out of the indexes and counts of the state it is leaving."""
        if stored.slot is not None:
            tr.clear(stored.slot)
            tr.clear(self._jobs.pack((stored.id, "slot")))
        meta = stored.meta() or {}
        if meta.get("state") == RUNNING and isinstance(meta.get("lease_until"), (int, float)):
            tr.clear(self._lease.pack((float(meta["lease_until"]), stored.id)))
            if isinstance(meta.get("route"), str):
                tr.clear(self._rslot.pack((meta["route"], stored.id)))
            if isinstance(meta.get("limit_key"), str):
                tr.clear(self._kslot.pack((meta["limit_key"], stored.id)))
        if isinstance(meta.get("_expire"), (int, float)):
            tr.clear(self._expire.pack((float(meta["_expire"]), stored.id)))
        if isinstance(meta.get("route"), str) and meta.get("state") in STATES:
            tr.add(self._count.pack((meta["route"], meta["state"])), _COUNTER_MINUS_ONE)
        elif stored.slot is not None:
            # Damaged fields, but the slot proves it was a pending record we counted.
            index = self._pdue if self._pdue.contains(stored.slot) else self._due
            tr.add(self._count.pack((index.unpack(stored.slot)[0], PENDING)), _COUNTER_MINUS_ONE)

    def _write(self, tr: Any, record: JobRecord, *, payload: bool = False, result: bool = False,
               position: int = 0, wakes: dict[tuple[str, str], int] | None = None,
               payload_chunks: int | None = None) -> None:
        """Store ``record`` and put it in the indexes of its state (the old ones are already gone).

        ``payload_chunks``: a record read with ``fields_only`` keeps the chunks it has (their count).
        """
        data = record.to_dict()
        blob, outcome = data.pop("payload"), data.pop("result")
        # A callback of 10,000 members names them all: kept in chunks beside the fields, written once.
        links = {name: data.pop(name) for name in ("parents", "inputs")}
        data["payload"] = len(_chunks(blob)) if payload_chunks is None else payload_chunks
        data["result"] = None if outcome is None else len(_chunks(outcome))
        data["_expire"] = None
        if record.state in FINISHED_STATES:
            data["_expire"] = (record.finished or time.time()) + self.ttl_of(record)
            tr[self._expire.pack((data["_expire"], record.id))] = b""
        elif record.state == RUNNING and record.lease_until is not None:
            tr[self._lease.pack((float(record.lease_until), record.id))] = b""
            # The slots are the lease: counted while it is live (see the claim).
            until = fdb.tuple.pack((float(record.lease_until),))
            tr[self._rslot.pack((record.route, record.id))] = until
            if record.limit_key is not None:
                tr[self._kslot.pack((record.limit_key, record.id))] = until
        elif record.state == PENDING:
            stamp = fdb.tuple.Versionstamp(user_version=position)
            if record.priority and record.target:
                slot = self._pdue.pack_with_versionstamp(
                    (record.route, -record.priority, record.target, float(record.due), stamp, record.id))
            elif record.priority:
                slot = self._pdue.pack_with_versionstamp(
                    (record.route, -record.priority, float(record.due), stamp, record.id))
            else:
                slot = self._due.pack_with_versionstamp(
                    (record.route, record.target or "", float(record.due), stamp, record.id))
            tr.set_versionstamped_key(slot, b"")
            tr.set_versionstamped_value(self._jobs.pack((record.id, "slot")), slot)
            waiting_for = (record.route, record.target or "")
            if record.due >= dependencies.WAITING_DUE:
                pass  # a workflow step waiting for its parents: nobody to wake yet
            elif wakes is None:
                self._wake_idle(tr, {waiting_for: 1})
            else:  # the caller wakes workers once, for the whole batch
                wakes[waiting_for] = wakes.get(waiting_for, 0) + 1
        tr[self._jobs.pack((record.id, "meta"))] = json.dumps(data, separators=(",", ":")).encode()
        if payload:
            for n, chunk in enumerate(_chunks(blob)):
                tr[self._jobs.pack((record.id, "payload", n))] = chunk
            if any(value is not None for value in links.values()):
                text = json.dumps(links, separators=(",", ":")).encode()
                for n, chunk in enumerate(_chunks(text)):
                    tr[self._jobs.pack((record.id, "links", n))] = chunk
        if result:
            span = self._jobs.range((record.id, "result"))
            tr.clear_range(span.start, span.stop)
            for n, chunk in enumerate(_chunks(outcome or b"")):
                tr[self._jobs.pack((record.id, "result", n))] = chunk
        tr.add(self._count.pack((record.route, record.state)), _COUNTER_ONE)

    def _wake_idle(self, tr: Any, wakes: dict[tuple[str, str], int], snapshot: bool = False) -> None:
        """Nudge idle workers for new pending records: ``wakes`` counts them per (route, target).

        ``snapshot``: read the idle registry without a conflict range (an application's long
        transaction, ``using=``, must not conflict with every worker going idle meanwhile).
        """
        now = None
        reader = tr.snapshot if snapshot else tr
        for (route, target), n in wakes.items():
            if target:  # only that worker may take it
                tr.add(self._nudge.pack((target,)), _COUNTER_ONE)
                continue
            span = self._idle.range((route,))
            entries = list(reader.get_range(span.start, span.stop))
            if not entries:
                continue
            now = tr.get_read_version().wait() if now is None else now
            live = [kv.key for kv in entries if _until(kv.value) > now]
            for entry in random.sample(live, min(len(live), n)):
                # Woken, it is no longer idle: the next producer wakes another one.
                tr.clear(entry)
                tr.add(self._nudge.pack((self._idle.unpack(entry)[1],)), _COUNTER_ONE)

    def _delete(self, tr: Any, stored: _Stored) -> None:
        self._unindex(tr, stored)
        span = self._jobs.range((stored.id,))
        tr.clear_range(span.start, span.stop)
        for space in (self._deps, self._settled, self._waits):
            span = space.range((stored.id,))
            tr.clear_range(span.start, span.stop)

    def _quarantine(self, tr: Any, stored: _Stored, route: str, why: str) -> None:
        # Keep the damaged bytes for inspection, but take the record out of every route.
        self._unindex(tr, stored)
        now = time.time()
        data = {"id": stored.id, "queue": self.queue, "route": route, "state": ERROR, "dead": True,
                "finished": now, "_expire": now + self.result_ttl,
                "error": policy.quarantined(why).error,
                "_damaged": (stored.raw_meta or b"")[:2000].decode("utf-8", "replace")}
        tr[self._jobs.pack((stored.id, "meta"))] = json.dumps(data).encode()
        tr[self._expire.pack((data["_expire"], stored.id))] = b""
        tr.add(self._count.pack((route, ERROR)), _COUNTER_ONE)

    # -- producers ----------------------------------------------------------------------------

    @_translate
    def enqueue(self, records: Sequence[JobRecord]) -> None:
        size = sum(_size(r) for r in records)
        if size > TRANSACTION_BUDGET and len(records) > 1 and all(r.workflow for r in records):
            # A workflow larger than a transaction (a group of 10,000) goes in several, in its order:
            # parents before their dependents, so each dependent attaches to parents already stored.
            # Not all-or-nothing: a failure part-way leaves the parts stored so far.
            batch: list[JobRecord] = []
            batch_size = 0
            for record in records:
                size = _size(record)
                if batch and (len(batch) >= WORKFLOW_BATCH or batch_size + size > TRANSACTION_BUDGET // 2):
                    self.enqueue(batch)
                    batch, batch_size = [], 0
                batch.append(record)
                batch_size += size
            self.enqueue(batch)
            return
        if size > TRANSACTION_BUDGET or len(records) > 0xFFFF:
            raise PayloadTooLarge(
                f"These {len(records)} jobs take about {size} bytes; one FoundationDB transaction "
                f"holds at most {TRANSACTION_BUDGET} (and 65535 jobs). Fire them in smaller batches."
            )

        def store(tr: Any) -> tuple[None, None]:
            wakes: dict[tuple[str, str], int] = {}
            stored = self._stored_already(tr, records)
            for position, record in enumerate(records):
                if record.id in stored:
                    continue
                stored.add(record.id)
                if record.parents:
                    record = self._attach(tr, record)
                self._write(tr, record, payload=True, result=record.result is not None, position=position,
                            wakes=wakes)
            self._wake_idle(tr, wakes)
            return None, None

        self._once(store, lambda _tr, _memo: None)

    @_translate
    def enqueue_keyed(self, records: Sequence[JobRecord]) -> list[str]:
        if not any(r.key is not None for r in records):
            self.enqueue(records)
            return [r.id for r in records]

        def store(tr: Any) -> tuple[list[str], list[str]]:
            holders = self._store_keyed(tr, records)
            return holders, holders

        return self._once(store, lambda _tr, memo: [str(h) for h in memo])

    def _stored_already(self, tr: Any, records: Sequence[JobRecord]) -> set[str]:
        """The ids of ``records`` whose record ``tr`` finds stored: each is left as it is.

        Ids are new per fire, so a stored one is the same record sent again: by the caller after
        an error whose commit had applied (``_once``'s marker covers only its own retries), and a
        worker may have claimed it since; written again, it would be pending and run twice at
        once. A conflicting read: a concurrent store of the same id makes one of the two retry.
        The reads are all sent before the first answer is waited for.
        """
        found = [(record.id, tr[self._jobs.pack((record.id, "meta"))]) for record in records]
        return {job_id for job_id, meta in found if meta.present()}

    def _store_keyed(self, tr: Any, records: Sequence[JobRecord], snapshot_wakes: bool = False,
                     taken: dict[str, str] | None = None) -> list[str]:
        """Store ``records`` in ``tr``; a key already held returns its holder's id.

        ``taken``: the keys this transaction already stored, and their holders (kept across calls
        in one application transaction by ``enqueue_in``).
        """
        # Reading the key's entry in the same transaction makes check-and-insert one
        # step: a concurrent enqueue of the same key conflicts and retries.
        holders: list[str] = []
        wakes: dict[tuple[str, str], int] = {}
        # Keys this transaction already stored: their holder's slot was written with a
        # versionstamp, which this transaction cannot read back (error 1036).
        taken = {} if taken is None else taken
        now = time.time()
        present = self._stored_already(tr, records)
        for position, record in enumerate(records):
            if record.key is not None and record.key in taken:
                holders.append(taken[record.key])
                continue
            if record.id in present:  # sent again (see _stored_already); its key, if any, is its own
                holders.append(record.id)
                continue
            if record.key is not None:
                held = tr[self._keys.pack((record.key,))]
                if held.present():
                    holder = bytes(held).decode()
                    stored = self._read_meta(tr, holder)
                    meta = stored.meta() if stored else None
                    if meta is not None and (meta.get("_expire") is None or meta["_expire"] >= now):
                        holders.append(holder)
                        taken[record.key] = holder
                        continue
                tr[self._keys.pack((record.key,))] = record.id.encode()
                taken[record.key] = record.id
            present.add(record.id)
            if record.parents:
                record = self._attach(tr, record)
            self._write(tr, record, payload=True, result=record.result is not None, position=position,
                        wakes=wakes)
            holders.append(record.id)
        self._wake_idle(tr, wakes, snapshot=snapshot_wakes)
        return holders

    supports_using = True

    # Not @_translate: an error of the application's transaction (a conflict, a retryable read)
    # must reach the application's retry loop as the FDBError it is.
    def enqueue_in(self, handle: Any, records: Sequence[JobRecord]) -> list[str]:
        """Store the records in ``handle``, the application's ``fdb.Transaction`` on the queue's cluster.

        The records exist exactly if that transaction commits, and the idle workers' wake-up key is
        written in it, so their watches fire at the commit. One transaction holds them all (no
        batches: a workflow over the transaction's size is refused). Retrying the transaction is
        the application's (``@fdb.transactional`` does it); after ``commit_unknown_result`` a
        retry may store the jobs again unless they have keys.
        """
        transaction_type = getattr(getattr(fdb, "impl", None), "Transaction", None)
        if transaction_type is None or not isinstance(handle, transaction_type):
            raise ConfigurationError(
                f"using= takes an fdb.Transaction for the fdb backend (what @fdb.transactional passes), not "
                f"{type(handle).__module__}.{type(handle).__qualname__}.")
        if not records:
            return []
        size = sum(_size(r) for r in records)
        if size > TRANSACTION_BUDGET or len(records) > 0xFFFF:
            raise PayloadTooLarge(
                f"These {len(records)} jobs take about {size} bytes; one FoundationDB transaction "
                f"holds at most {TRANSACTION_BUDGET} (and 65535 jobs), and using= puts them in yours.")
        self._check_same_cluster(handle)
        mine = self._stored_in_transaction(handle)
        holders = self._store_keyed(handle, records, snapshot_wakes=True, taken=mine.keys)
        mine.records.update((record.id, record) for record, holder in zip(records, holders) if holder == record.id)
        return holders

    def _stored_in_transaction(self, handle: Any) -> _InTransaction:
        """What this queue stored in ``handle``'s transaction so far (nothing, for a new read version)."""
        version = handle.get_read_version().wait()
        mine = self._in_transaction.get(handle)
        if mine is None or mine.version != version:
            mine = self._in_transaction[handle] = _InTransaction(version)
        return mine

    def _check_same_cluster(self, tr: Any) -> None:
        """Refuse a transaction on another cluster than the queue's (once per database object).

        The queue keeps a random identity under its root; the caller's transaction must read the same.
        """
        database = getattr(tr, "db", None)
        if database is not None and database is self._checked_database:
            return
        key = fdb.Subspace((self.db,)).pack(("~cluster",))

        def identity(t: Any) -> tuple[bytes, None]:
            found = t[key]
            if found.present():
                return bytes(found), None
            made = uuid.uuid4().bytes
            t[key] = made
            return made, None

        ours = _translate(lambda _self: self._once(identity, None))(self)
        theirs = tr.snapshot[key]  # a snapshot read: no conflict with the queue's own writes
        if not theirs.present() or bytes(theirs) != ours:
            raise ConfigurationError(
                f"The transaction given with using= is on another FoundationDB cluster than the queue's "
                f"({self.where}); open it from the queue's cluster file.")
        self._checked_database = database

    # -- settings and throughput counters --------------------------------------------

    @_translate
    def get_setting(self, name: str) -> str | None:
        value = fdb.transactional(lambda tr: tr[self._settings.pack((name,))])(self._db)
        return bytes(value).decode() if value.present() else None

    @_translate
    def put_setting(self, name: str, value: str | None) -> None:
        def put(tr: Any) -> tuple[None, None]:
            if value is None:
                tr.clear(self._settings.pack((name,)))
            else:
                tr[self._settings.pack((name,))] = value.encode()
            route = flow.route_of_setting(name)
            if route is not None:  # a resume or a new limit: the route's idle workers look again
                self._flows.pop(route, None)
                self._wake_idle(tr, {(route, ""): 10_000})
            return None, None

        self._once(put, None)  # putting the same value again changes nothing

    @_translate
    def add_stats(self, samples: Sequence[RouteMinute]) -> None:
        def add(tr: Any) -> tuple[None, None]:
            for sample in samples:
                for name, value in sample.counts.items():
                    tr.add(self._stats.pack((sample.minute, sample.route, name)),
                           int(value).to_bytes(8, "little", signed=True))
            oldest = int((time.time() - RETENTION) // 60)
            tr.clear_range(self._stats.range().start, self._stats.pack((oldest,)))
            return None, None

        # Atomic adds are not idempotent: a marker makes a retried commit add once.
        self._once(add, lambda _tr, _memo: None)

    @_translate
    def stats(self, since_minute: int) -> list[RouteMinute]:
        def read(tr: Any) -> list[tuple[bytes, bytes]]:
            return [(kv.key, kv.value) for kv in
                    tr.get_range(self._stats.pack((since_minute,)), self._stats.range().stop)]

        found: dict[tuple[str, int], RouteMinute] = {}
        for key, value in fdb.transactional(read)(self._db):
            minute, route, name = self._stats.unpack(key)
            entry = found.setdefault((route, minute), RouteMinute(route, minute))
            entry.counts[name] = int.from_bytes(bytes(value), "little", signed=True)
        return list(found.values())

    @_translate
    def get(self, job_id: str) -> JobRecord | None:
        stored = fdb.transactional(lambda tr: self._read(tr, job_id))(self._db)
        return None if stored is None else stored.record()

    @_translate
    def list_jobs(self, *, route: str | None = None, state: str | None = None,
                  dead: bool | None = None, limit: int = 1000) -> list[JobRecord]:
        found: list[JobRecord] = []
        for stored in self._scan():
            try:
                record = stored.record()
            except MalformedRecord:
                continue
            if ((route is None or record.route == route) and (state is None or record.state == state)
                    and (dead is None or record.dead == dead)):
                found.append(record)
        found.sort(key=lambda r: (r.due, r.id))
        return found[:limit]

    # Records one list_page call reads past its cursor, however few of them match its filters.
    PAGE_SCAN = 1000

    pages_newest_first = True

    @_translate
    def list_page(self, *, route: str | None = None, state: str | None = None, dead: bool | None = None,
                  limit: int = 100, after: str | None = None,
                  newest: bool = False) -> tuple[list[JobRecord], str | None]:
        # Keyset paging in id (creation) order over the job keys: a call reads at most PAGE_SCAN records
        # past its cursor, however deep the page and however rarely the filters match; the default
        # offset cursor read the whole queue for every page. The cursor is "i:<the last id looked at>"
        # ("n:" newest first: the job keys read backwards).
        mark = "n:" if newest else "i:"
        if after is not None and not after.startswith(mark):
            raise ValueError(f"{after!r} is not a page cursor of this store")
        scan = max(limit, self.PAGE_SCAN)
        if newest:
            records: Iterator[_Stored] = self._scan_back_from(
                self._jobs.range((after[2:],)).start if after else self._jobs.range().stop)
        else:
            records = self._scan_from(self._jobs.range((after[2:],)).stop if after else self._jobs.range().start)
        found: list[JobRecord] = []
        looked = 0
        for stored in records:
            looked += 1
            try:
                record = stored.record()
            except MalformedRecord:
                record = None
            if record is not None and ((route is None or record.route == route)
                                       and (state is None or record.state == state)
                                       and (dead is None or record.dead == dead)):
                found.append(record)
            if len(found) == limit or looked == scan:
                return found, f"{mark}{stored.id}"
        return found, None

    # Records read backwards per transaction: each is found with a one-key reverse read, then read whole.
    BACK_BATCH = 50

    def _scan_back_from(self, end: bytes) -> Iterator[_Stored]:
        """The queue's records whose keys lie before ``end``, newest id first, a batch per transaction."""
        start = self._jobs.range().start

        def batch(tr: Any, before: bytes) -> list[_Stored]:
            out: list[_Stored] = []
            while len(out) < self.BACK_BATCH:
                last = list(tr.snapshot.get_range(start, before, limit=1, reverse=True))
                if not last:
                    break
                try:
                    job_id = self._jobs.unpack(last[0].key)[0]
                except ValueError:  # not a tuple: nothing SkunkQueue wrote
                    before = last[0].key
                    continue
                span = self._jobs.range((job_id,))
                stored = _Stored(job_id)
                for kv in tr.snapshot.get_range(span.start, span.stop):
                    stored.add(self._jobs.unpack(kv.key)[1:], kv.value)
                out.append(stored)
                before = span.start
            return out

        while True:
            stored_batch = fdb.transactional(lambda tr, b=end: batch(tr, b))(self._db)
            if not stored_batch:
                return
            yield from stored_batch
            end = self._jobs.range((stored_batch[-1].id,)).start

    def _scan(self) -> list[_Stored]:
        """Every record of the queue (see :meth:`_scan_from`)."""
        return list(self._scan_from(self._jobs.range().start))

    def _scan_from(self, begin: bytes) -> Iterator[_Stored]:
        """The queue's records from key ``begin`` on, a page per transaction (one must stay under 5 s).

        Values can be 90 kB each: the page's row count follows the bytes the
        last page held, so that a page stays near SCAN_PAGE_BYTES.
        """
        end = self._jobs.range().stop
        page = 20  # at most 20 values of 90 kB in the first page; later pages follow the bytes seen
        while True:
            kvs = fdb.transactional(lambda tr, b=begin, n=page: list(tr.snapshot.get_range(b, end, limit=n)))(
                self._db)
            size = sum(len(kv.key) + len(kv.value) for kv in kvs)
            groups: dict[str, list[Any]] = {}
            for kv in kvs:
                try:
                    job_id = self._jobs.unpack(kv.key)[0]
                except ValueError:
                    continue  # not a tuple: nothing SkunkQueue wrote
                groups.setdefault(job_id, []).append(kv)
            full = len(kvs) == page
            if full and len(groups) > 1:  # the last record may continue on the next page
                last = list(groups)[-1]
                begin = groups.pop(last)[0].key
            elif full:
                begin = kvs[-1].key + b"\x00"
            for job_id, group in groups.items():
                stored = _Stored(job_id)
                for kv in group:
                    stored.add(self._jobs.unpack(kv.key)[1:], kv.value)
                yield stored
            if not full:
                return
            page = max(10, min(2000, int(page * SCAN_PAGE_BYTES / max(size, 1))))

    @_translate
    def counts(self) -> dict[tuple[str, str], int]:
        span = self._count.range()
        kvs = fdb.transactional(lambda tr: list(tr.snapshot.get_range(span.start, span.stop)))(self._db)
        counts = {}
        for kv in kvs:
            route, state = self._count.unpack(kv.key)
            n = int.from_bytes(kv.value, "little", signed=True)
            if n > 0:
                counts[(route, state)] = n
        return counts

    @_translate
    def purge(self, route: str, *, target: str | None = None) -> int:
        spans = [(self._due, self._due.range((route,) if target is None else (route, target)))]
        if target is None:
            spans.append((self._pdue, self._pdue.range((route,))))
        else:  # the target's broadcasts of each priority (housekeeping purges a dead worker's)
            levels = fdb.transactional(lambda tr: list(self._levels(tr, route)))(self._db)
            spans += [(self._pdue, self._pdue.range((route, level, target))) for level in levels]

        def purge_some(tr: Any) -> tuple[tuple[int, bool], list[Any]]:
            entries = [(index, kv) for index, span in spans
                       for kv in tr.snapshot.get_range(span.start, span.stop, limit=100)]
            deleted = 0
            for index, kv in entries:
                job_id = index.unpack(kv.key)[-1]
                stored = self._read_meta(tr, job_id)
                meta = stored.meta() if stored else None
                if stored is None or stored.slot != kv.key:
                    tr.clear(kv.key)  # an entry left behind by something else: drop it
                elif meta is None or meta.get("state") == PENDING:
                    self._delete(tr, stored)
                    deleted += 1
            done = (deleted, len(entries) > 0)
            return done, list(done)

        total, more = 0, True
        while more:
            deleted, more = self._once(purge_some, lambda _tr, memo: (int(memo[0]), bool(memo[1])))
            total += deleted
        return total

    @_translate
    def request_kill(self, job_id: str) -> bool:
        def flag(tr: Any) -> tuple[bool, bool]:
            stored = self._read(tr, job_id)
            if stored is None:
                return False, False
            try:
                record = stored.record()
            except MalformedRecord:
                return False, False
            if record.state != RUNNING:
                return False, False
            record.kill_requested = True
            self._unindex(tr, stored)
            self._write(tr, record)
            return True, True

        return self._once(flag, None)  # flagging again changes nothing

    # -- workers --------------------------------------------------------------------------------

    @_translate
    def claim(self, route: str, worker_id: str, lease: float, limit: int = 1) -> list[JobRecord]:
        attempts = [0]

        def take(tr: Any) -> tuple[list[JobRecord], list[list[Any]]]:
            if attempts[0] > 1:  # the last attempt conflicted with another claimer: spread wider
                self._spread[route] = min(CLAIM_SPREAD_MAX, self._spread.get(route, 1.0) * 2)
            now = time.time()
            window = max(limit, int(limit * self._spread.get(route, 1.0)))
            paused, route_limit = self._route_flow(tr, route)
            if paused:
                self._held_back[route] = None
                return [], []
            room = limit
            if route_limit is not None and route_limit.concurrency is not None:
                live = self._live_slots(tr, self._rslot.range((route,)), now)
                room = min(room, route_limit.concurrency - len(live))
                if room <= 0:
                    self._held_back[route] = min(live)
                    return [], []
            # A snapshot read: a producer adding work, or another claimer taking a
            # different record of this window, must not abort this claim. What makes
            # the claim exclusive is the conflicting read of each chosen record below.
            ordered = self._ordered(tr, route, worker_id, now, window)
            candidates = [key for _, key in zip(range(window), ordered)]
            if len(candidates) > limit:
                picked = set(random.sample(candidates, limit))
                # The window's others, then the records behind it, are looked at only if
                # a limit skips some of the picked ones.
                rest = [key for key in candidates if key not in picked]
                candidates = [key for key in candidates if key in picked] + rest
            claimed: list[JobRecord] = []
            admission = flow.Admission(now, route, route_limit, lambda name: self._rate_time(tr, name))
            for looked, key in enumerate(itertools.chain(candidates, ordered), 1):
                if len(claimed) >= room:
                    break
                if looked - len(claimed) > flow.FLOW_SCAN:  # looked at past those taken
                    admission.hold(None)
                    break
                index = self._pdue if self._pdue.contains(key) else self._due
                job_id = index.unpack(key)[-1]
                stored = self._read(tr, job_id)
                if stored is None or stored.slot != key:
                    tr.clear(key)  # stale or foreign index entry
                    continue
                try:
                    record = stored.record()
                except MalformedRecord as exc:
                    self._quarantine(tr, stored, route, str(exc))
                    continue
                decision = admission.admit(record.limit_key, record.limit_concurrency, record.limit_interval,
                                           record.limit_burst, lambda key, cap: self._key_full(tr, key, cap, now))
                if decision == flow.STOP:
                    break  # the route's own rate: the claim ends
                if decision == flow.SKIP:
                    continue
                self._unindex(tr, stored)
                record.claim_by(worker_id, now, lease)
                self._write(tr, record)
                claimed.append(record)
            for name, at in admission.to_write(now):
                tr[self._rate.pack((name,))] = fdb.tuple.pack((at,))
            if admission.held_back and len(claimed) < limit:
                self._held_back[route] = admission.wake
            else:
                self._held_back.pop(route, None)
            return claimed, [[r.id, r.token] for r in claimed]

        def replay(tr: Any, memo: list[list[Any]]) -> list[JobRecord]:
            # The earlier attempt claimed these: hand them over, if still ours.
            records = []
            for job_id, token in memo:
                stored = self._read(tr, job_id)
                try:
                    record = stored.record() if stored else None
                except MalformedRecord:
                    continue
                if record is not None and record.state == RUNNING and record.token == token \
                        and record.owner == worker_id:
                    records.append(record)
            return records

        claimed = self._once(take, replay, attempts)
        if attempts[0] == 1 and route in self._spread:
            # No conflict: drift back towards strict order.
            self._spread[route] = max(1.0, self._spread[route] * 0.97)
        return claimed

    # -- flow control (inside the claim's transaction; see the module docstring) ------------------

    supports_priorities = True
    supports_limits = True
    supports_pause = True

    def _route_flow(self, tr: Any, route: str) -> tuple[bool, flow.RouteLimit | None]:
        """The route's paused flag and limit, read at most SETTINGS_TTL seconds ago.

        Snapshot reads, kept per route: an idle worker claims once per round, and two reads of
        settings that hardly ever change were a quarter of an empty claim's requests.
        """
        now = time.monotonic()
        found = self._flows.get(route)
        if found is None or now - found[0] > flow.SETTINGS_TTL:
            paused = tr.snapshot[self._settings.pack((flow.pause_setting(route),))]
            limit = tr.snapshot[self._settings.pack((flow.limit_setting(route),))]
            found = self._flows[route] = (now, paused.present(), flow.RouteLimit.from_json(
                bytes(limit).decode() if limit.present() else None))
        return found[1], found[2]

    def _live_slots(self, tr: Any, span: Any, now: float) -> list[float]:
        """The live leases among a key's or route's slots: a conflicting read, so that two claims
        racing for the last slot conflict and the retry sees the winner."""
        return [until for until in (_until(kv.value) for kv in tr.get_range(span.start, span.stop)) if until > now]

    def _levels(self, tr: Any, route: str) -> Iterator[int]:
        """The route's priority levels other than 0 as stored (-priority, so highest first), found
        one by one with snapshot reads: those of shared records and of any worker's broadcasts."""
        span = self._pdue.range((route,))
        begin = span.start
        while True:
            first = list(tr.snapshot.get_range(begin, span.stop, limit=1))
            if not first:
                return
            level = self._pdue.unpack(first[0].key)[1]
            yield level
            begin = self._pdue.range((route, level)).stop

    def _streams(self, route: str, worker_id: str, level: int | None) -> list[tuple[Any, tuple[Any, ...], bytes]]:
        """(index, prefix, first key) of the due streams of one level (None: priority 0) that a
        claim of ``worker_id`` merges: the shared records' and the worker's broadcasts'."""
        if level is None:
            return [(self._due, (route, target), self._due.range((route, target)).start) for target in ("", worker_id)]
        # Shared records follow the level's broadcasts (a float sorts after every string).
        return [(self._pdue, (route, level), self._pdue.pack((route, level, -math.inf))),
                (self._pdue, (route, level, worker_id), self._pdue.range((route, level, worker_id)).start)]

    def _ordered(self, tr: Any, route: str, worker_id: str, now: float, page: int) -> Iterator[bytes]:
        """Due keys of the route in claim order: priority descending, then (due, versionstamp);
        each priority merges the shared and the worker's broadcast records. Snapshot reads."""
        zero_done = False
        for level in self._levels(tr, route):
            if not zero_done and level > 0:
                yield from self._merged(tr, self._streams(route, worker_id, None), now, page)
                zero_done = True
            yield from self._merged(tr, self._streams(route, worker_id, level), now, page)
        if not zero_done:
            yield from self._merged(tr, self._streams(route, worker_id, None), now, page)

    def _paged(self, tr: Any, begin: bytes, end: bytes, page: int) -> Iterator[bytes]:
        while True:
            kvs = list(tr.snapshot.get_range(begin, end, limit=page))
            for kv in kvs:
                yield kv.key
            if len(kvs) < page:
                return
            begin = kvs[-1].key + b"\x00"  # the key right after the last one

    def _merged(self, tr: Any, streams: list[tuple[Any, tuple[Any, ...], bytes]], now: float,
                page: int) -> Iterator[bytes]:
        def stream(index: Any, prefix: tuple[Any, ...], begin: bytes) -> Iterator[tuple[bytes, bytes]]:
            packed = index.pack(prefix)
            for key in self._paged(tr, begin, index.pack((*prefix, now)) + b"\xff", page):
                yield key[len(packed):], key  # (due, versionstamp, id) order across both

        for _order, key in heapq.merge(*(stream(*s) for s in streams)):
            yield key

    def _key_full(self, tr: Any, key: str, cap: int | None, now: float) -> float | None:
        """None if the key has a free slot, else when its first live lease runs out."""
        if cap is None:
            return None
        live = self._live_slots(tr, self._kslot.range((key,)), now)
        return min(live) if len(live) >= cap else None

    def _rate_time(self, tr: Any, name: str) -> float | None:
        value = tr[self._rate.pack((name,))]
        return _until(bytes(value)) if value.present() else None

    @_translate
    def rate_times(self, names: Sequence[str]) -> dict[str, float]:
        def read(tr: Any) -> dict[str, float]:
            values = [(name, tr.snapshot[self._rate.pack((name,))]) for name in names]
            return {name: _until(bytes(v)) for name, v in values if v.present()}

        now = time.time()
        return {name: at for name, at in fdb.transactional(read)(self._db).items() if at > now}

    @_translate
    def renew(self, worker_id: str, leases: Sequence[tuple[str, int]], lease: float) -> dict[str, str]:
        def extend(tr: Any) -> tuple[dict[str, str], dict[str, str]]:
            until = time.time() + lease
            statuses = {}
            for job_id, token in leases:
                stored = self._read(tr, job_id)
                try:
                    record = stored.record() if stored else None
                except MalformedRecord:
                    record = None
                if stored is None or record is None or record.state != RUNNING or record.token != token:
                    statuses[job_id] = LEASE_LOST
                    continue
                self._unindex(tr, stored)
                record.lease_until = until
                self._write(tr, record)
                statuses[job_id] = LEASE_KILL if record.kill_requested else LEASE_OK
            return statuses, statuses

        return self._once(extend, None)  # extending again changes nothing

    @_translate
    def finish(self, job_id: str, token: int, outcome: Outcome, *, expect: str = RUNNING) -> bool:
        left: list[str] = []  # parents whose count-down this finish left part-way

        def apply(tr: Any) -> tuple[bool, bool]:
            left.clear()
            stored = self._read(tr, job_id)
            if stored is None:
                return False, False
            record = stored.record()
            if record.state != expect or record.token != token:
                return False, False
            self._unindex(tr, stored)
            updated = outcome.apply_to(record, time.time())
            self._write(tr, updated, result=True)
            if record.state == RUNNING and updated.state != PENDING and (
                    record.limit_key is not None or self._route_flow(tr, record.route)[1] is not None):
                self._wake_idle(tr, {(record.route, ""): 1})  # its slot is free: a waiter may claim
            if updated.finished_state:
                if record.parents:
                    tr.clear(self._waits.pack((job_id,)))
                left.extend(self._settle(tr, job_id, updated.state))
            return True, True

        done = self._once(apply, lambda _tr, memo: bool(memo))
        if left:
            try:
                self._settle_left(left)
            except fdb.FDBError as exc:  # the finish stands; housekeeping carries the count-down on
                log.warning("FoundationDB (%s): counting down %s's dependents stopped part-way (%s); "
                            "housekeeping carries it on", self.where, job_id, exc.description)
        return done

    # -- workflows: see the Persistence docstring (inside the transactions above) ---------------

    supports_workflows = True

    def _attach(self, tr: Any, record: JobRecord) -> JobRecord:
        """A new waiting record as it must be stored: its parents that already finished (or no longer
        exist: they count as killed) are counted now, so it may be stored released or ended at once.

        Decided before the record is written: a record's slot written in this transaction cannot be
        read back (a versionstamped key), so it is not written only to be moved at once.
        """
        parents = dependencies.unique(record.parents or ())
        # Every parent's read is sent before the first answer is waited for: a callback of a group
        # of 10,000 read one at a time takes 10,000 round trips, past the five seconds a
        # transaction may read for (transaction_too_old, retried until the timeout).
        metas = [(parent, tr[self._jobs.pack((parent, "meta"))]) for parent in parents]
        finished: dict[str, str] = {}
        for parent, meta in metas:
            tr[self._deps.pack((parent, record.id))] = b""
            try:
                state = json.loads(bytes(meta)).get("state") if meta.present() else None
            except (ValueError, AttributeError):
                state = None
            if not meta.present():
                finished[parent] = dependencies.missing_parent_state()
            elif state in FINISHED_STATES:
                finished[parent] = str(state)
        for parent, state in finished.items():
            tr[self._settled.pack((record.id, parent))] = state.encode()
        run_anyway = dependencies.runs_anyway(record)
        for parent, state in finished.items():
            if dependencies.kills_dependent(state, run_anyway):
                return dependencies.dependency_failed(parent, state).apply_to(record, time.time())
        if len(finished) == len(parents):
            return dataclasses.replace(record, due=time.time())
        tr[self._waits.pack((record.id,))] = json.dumps(
            {"left": len(parents) - len(finished), "run": run_anyway}).encode()
        return record

    def _settle(self, tr: Any, parent: str, state: str, after: str | None = None) -> list[str]:
        """Count a finished parent into its dependents' sets; release or end those it completes.

        A dependent ended here counts for its own dependents in turn (a worklist: a chain may be long).
        A step may have thousands of dependents (``chain(a, group(...))``): each read of a level is
        sent before the first answer is waited for, and the released ones wake idle workers once.
        One transaction counts at most ``SETTLE_BUDGET`` dependents. A parent with more left gets a
        ``settling`` entry (its state, the last dependent counted) in the same transaction, and
        ``_settle_left`` carries on from it in further ones; its parents are returned. ``after``:
        carrying on an entry from there ("" for its start). Counting is idempotent (a mark per parent
        and dependent), so a part done twice, by the finisher and by housekeeping, counts once.
        """
        work: list[tuple[str, str, str | None]] = [(parent, state, after)]
        wakes: dict[tuple[str, str], int] = {}
        budget = SETTLE_BUDGET
        left: list[str] = []
        while work:
            parent, state, after = work.pop()
            span = self._deps.range((parent,))
            begin = self._deps.pack((parent, after)) + b"\x00" if after else span.start
            rows = list(tr.get_range(begin, span.stop, limit=budget + 1))
            children = [self._deps.unpack(kv.key)[1] for kv in rows[:budget]]
            budget -= len(children)
            entry = self._settling.pack((parent,))
            if len(rows) > len(children):
                tr[entry] = json.dumps({"state": state, "after": children[-1] if children else after or "",
                                        "at": time.time()}).encode()
                left.append(parent)
            elif after is not None:
                tr.clear(entry)
            sent = [(child, tr[self._settled.pack((child, parent))], tr[self._waits.pack((child,))])
                    for child in children]
            ending: list[tuple[str, Outcome]] = []
            releasing: list[str] = []
            for child, mark, raw in sent:
                if mark.present():
                    continue  # this parent was counted already
                tr[self._settled.pack((child, parent))] = state.encode()
                if not raw.present():
                    continue  # released, or ended, already
                wait = json.loads(bytes(raw))
                if dependencies.kills_dependent(state, bool(wait.get("run"))):
                    tr.clear(self._waits.pack((child,)))
                    ending.append((child, dependencies.dependency_failed(parent, state)))
                elif int(wait["left"]) <= 1:
                    tr.clear(self._waits.pack((child,)))
                    releasing.append(child)
                else:
                    wait["left"] = int(wait["left"]) - 1
                    tr[self._waits.pack((child,))] = json.dumps(wait).encode()
            found = self._read_metas(tr, [child for child, _ in ending] + releasing)
            for child, outcome in ending:
                if self._end_waiting(tr, found[child], outcome):
                    work.append((child, "killed", None))
            for child in releasing:
                self._release(tr, found[child], wakes)
        if wakes:
            self._wake_idle(tr, wakes)
        return left

    def _settle_left(self, parents: list[str], stale_before: float | None = None) -> None:
        """Carry on the count-downs of ``parents`` left in ``settling``, a transaction per part, until
        none is left (parts may leave more, for dependents they end). ``stale_before``: only
        entries last carried on before then (housekeeping's: a live finisher is still at them)."""
        todo = list(parents)
        while todo:
            parent = todo.pop()

            def part(tr: Any, parent: str = parent) -> tuple[list[str], None]:
                raw = tr[self._settling.pack((parent,))]
                if not raw.present():
                    return [], None
                entry = json.loads(bytes(raw))
                if stale_before is not None and float(entry.get("at", 0)) >= stale_before:
                    return [], None
                return self._settle(tr, parent, str(entry["state"]), str(entry.get("after") or "")), None

            todo += self._once(part, None)

    def _release(self, tr: Any, stored: _Stored | None, wakes: dict[tuple[str, str], int]) -> None:
        """Make a waiting record (read with ``_read_metas``) due now."""
        record = _fields(stored)
        if stored is None or record is None or not dependencies.waiting(record):
            return  # killed or purged while it waited
        self._unindex(tr, stored)
        record.due = time.time()
        self._write(tr, record, wakes=wakes, payload_chunks=_payload_chunks(stored))

    def _end_waiting(self, tr: Any, stored: _Stored | None, outcome: Outcome) -> bool:
        """End a waiting record (read with ``_read_metas``) with ``outcome``."""
        record = _fields(stored)
        if stored is None or record is None or record.state != PENDING:
            return False
        self._unindex(tr, stored)
        ended = outcome.apply_to(record, time.time())
        # A record that waited never ran: it has no result to clear (a range clear per dependent).
        self._write(tr, ended, result=ended.result is not None, payload_chunks=_payload_chunks(stored))
        return True

    @_translate
    def get_many(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        @fdb.transactional
        def read(tr: Any, ids: Sequence[str]) -> list[_Stored | None]:
            return [self._read(tr, job_id) for job_id in ids]

        found: list[JobRecord | None] = []
        for start in range(0, len(job_ids), 500):  # a transaction per 500: well inside its five seconds
            found += [None if s is None else s.record() for s in read(self._db, job_ids[start:start + 500])]
        return found

    def get_many_in(self, handle: Any, job_ids: Sequence[str]) -> list[JobRecord | None]:
        """Read through the application's transaction, so that jobs stored in it count. Not translated:
        its errors (a conflict, a retryable one) go to the application's retry loop, as enqueue_in's do."""
        transaction_type = getattr(getattr(fdb, "impl", None), "Transaction", None)
        if transaction_type is None or not isinstance(handle, transaction_type):
            return self.get_many(job_ids)  # enqueue_in refuses such a handle, in one line
        self._check_same_cluster(handle)
        mine = self._stored_in_transaction(handle).records
        found: list[JobRecord | None] = []
        for job_id in job_ids:
            if job_id in mine:
                found.append(mine[job_id])
            else:
                read = self._read(handle, job_id)
                found.append(None if read is None else read.record())
        return found

    @_translate
    def dependents(self, job_id: str) -> list[str]:
        span = self._deps.range((job_id,))
        rows = fdb.transactional(lambda tr: list(tr.get_range(span.start, span.stop)))(self._db)
        return sorted(self._deps.unpack(kv.key)[1] for kv in rows)

    @_translate
    def expired_leases(self, now: float, limit: int = 100) -> list[JobRecord]:
        now = float(now)  # the tuple layer orders ints and floats apart

        @fdb.transactional
        def find(tr: Any) -> list[JobRecord]:
            records = []
            for kv in tr.snapshot.get_range(self._lease.range().start, self._lease.pack((now,)), limit=limit):
                stored = self._read(tr.snapshot, self._lease.unpack(kv.key)[-1])
                try:
                    record = stored.record() if stored else None
                except MalformedRecord:
                    continue
                if record is not None and record.state == RUNNING:
                    records.append(record)
            return records

        return find(self._db)

    @_translate
    def delete_expired(self, now: float, limit: int = 1000) -> int:
        # Also sweeps old step markers and idle entries: housekeeping calls this about once a second.
        # Count-downs whose finisher stopped part-way (died, or lost the cluster): carried on here.
        self._settle_left(self._delete_expired(float(now)), stale_before=float(now) - SETTLE_STALE)
        return 0  # a bounded batch each call (EXPIRE_BATCH); the count is not kept

    def _delete_expired(self, now: float) -> list[str]:
        """Delete what has expired; return parents with a count-down left part-way (a few)."""
        def delete(tr: Any) -> tuple[list[str], None]:
            # Markers of steps long over: a blind range clear, which conflicts with nothing.
            old = (self._applied.range().start, self._applied.pack((now - APPLIED_KEEP,)))
            if list(tr.snapshot.get_range(*old, limit=1)):
                tr.clear_range(*old)
            # Idle entries of workers that stopped (or died) long ago.
            idle = self._idle.range()
            lapsed = tr.get_read_version().wait() - IDLE_KEEP * VERSIONS_PER_SECOND
            for kv in tr.snapshot.get_range(idle.start, idle.stop):
                if _until(kv.value) < lapsed:
                    tr.clear(kv.key)
            for kv in tr.snapshot.get_range(self._expire.range().start, self._expire.pack((now,)),
                                            limit=EXPIRE_BATCH):
                expire_at, job_id = self._expire.unpack(kv.key)
                stored = self._read_meta(tr, job_id)
                meta = stored.meta() if stored else None
                if stored is not None and meta is not None and meta.get("_expire") == expire_at:
                    self._delete(tr, stored)
                else:
                    tr.clear(kv.key)  # the record was requeued or deleted since
            settling = self._settling.range()
            return [self._settling.unpack(kv.key)[0]
                    for kv in tr.snapshot.get_range(settling.start, settling.stop, limit=10)], None

        return self._once(delete, None)

    @_translate
    def register_worker(self, info: WorkerInfo) -> None:
        def register(tr: Any) -> tuple[None, None]:
            tr[self._workers.pack((info.id,))] = json.dumps(info.to_dict()).encode()
            self._stamp_clock(tr, info.id)
            return None, None

        self._once(register, None)

    def _stamp_clock(self, tr: Any, worker_id: str) -> None:
        # This host's clock beside the cluster's version at the same moment: peers compare
        # their own clocks with it (clock_offsets), since leases are timed in hosts' clocks.
        tr[self._clocks.pack((worker_id,))] = fdb.tuple.pack((time.time(), tr.get_read_version().wait()))

    @_translate
    def heartbeat(self, worker_id: str, state: str) -> bool:
        def beat(tr: Any) -> tuple[bool, bool]:
            key = self._workers.pack((worker_id,))
            value = tr[key]
            if not value.present():
                return False, False
            info = json.loads(bytes(value))
            info.update(state=state, last_seen=time.time())
            tr[key] = json.dumps(info).encode()
            self._stamp_clock(tr, worker_id)
            return True, True

        return self._once(beat, None)

    @_translate
    def unregister_worker(self, worker_id: str) -> None:
        def unregister(tr: Any) -> tuple[None, None]:
            del tr[self._workers.pack((worker_id,))]
            del tr[self._clocks.pack((worker_id,))]
            return None, None

        self._once(unregister, None)

    @_translate
    def clock_offsets(self) -> list[float]:
        span = self._clocks.range()

        def read(tr: Any) -> tuple[float, int, list[Any]]:
            before = time.time()
            version = tr.get_read_version().wait()
            after = time.time()
            return (before + after) / 2, version, list(tr.snapshot.get_range(span.start, span.stop))

        here, version, stamps = fdb.transactional(read)(self._db)
        offsets = []
        for kv in stamps:
            try:
                their_time, their_version = fdb.tuple.unpack(kv.value)
                age = (version - int(their_version)) / VERSIONS_PER_SECOND
            except (ValueError, TypeError):
                continue
            # Only fresh stamps: versions advance about a million a second, but jump ahead after
            # a cluster recovery, which makes an older stamp look old rather than skewed.
            if 0 <= age <= CLOCK_STAMP_FRESH:
                offsets.append(float(their_time) + age - here)
        return offsets

    @_translate
    def workers(self) -> list[WorkerInfo]:
        span = self._workers.range()
        kvs = fdb.transactional(lambda tr: list(tr.snapshot.get_range(span.start, span.stop)))(self._db)
        found = []
        for kv in kvs:
            try:
                found.append(WorkerInfo.from_dict(json.loads(kv.value)))
            except (ValueError, TypeError):
                continue
        return found

    # -- waiting: FoundationDB watches instead of polling ---------------------------------------

    @_translate
    def wait_for_work(self, route: str, worker_id: str, timeout: float, idle: float = 0.0) -> None:
        nudge = self._nudge.pack((worker_id,))
        # The nudge counter's value the last watch was armed on, once one fired (it may have
        # fired for a nudge, for nothing, or with an error: the next arm reads the counter anyway).
        fired_on: list[bytes | None] = []

        def arm(tr: Any) -> tuple[tuple[float | None, bytes | None, list[Any], bool], None]:
            seen = _raw(tr.snapshot[nudge])
            if fired_on and seen != fired_on[0]:
                return (None, seen, [], True), None  # nudged: the caller claims
            now = time.time()
            next_due = None
            held = route in self._held_back
            for due in self._first_dues(tr, route, worker_id, now if held else None):
                next_due = due if next_due is None else min(next_due, due)
            if held:
                # The due records were left behind by a limit or a pause: no reason to return at
                # once. Wait for a nudge (a finish, a setting, new work), for the time the claim
                # said one may be claimable, or for a record due later.
                at = self._held_back.get(route)
                if at is not None:
                    next_due = at if next_due is None else min(next_due, at)
            elif next_due is not None and next_due <= now:
                return (next_due, seen, [], False), None
            # Lapses just after this wait ends, so a worker that turned busy is not nudged for long.
            # Measured in the cluster's versions, not in this machine's clock: producers on
            # machines whose clocks differ from this one's by seconds still see it live.
            until = fdb.tuple.pack((tr.get_read_version().wait() + int((timeout + 0.1) * VERSIONS_PER_SECOND),))
            tr[self._idle.pack((route, worker_id))] = until
            return (next_due, seen, [tr.watch(nudge)], False), None

        deadline = time.monotonic() + timeout
        while True:
            (next_due, seen, watches, nudged) = self._once(arm, None)
            if nudged:
                self._watch_backoff = 0.0
                return
            if not watches:
                return  # work is due now
            if fired_on:
                # The last watch fired with an error (too many watches, a cluster hiccup) or
                # without a change: wait before waiting on this one, so that the worker does not
                # spin. (A nudge meanwhile fires this watch: it is seen when the pause ends.)
                self._watch_backoff = min(WATCH_BACKOFF[1], max(WATCH_BACKOFF[0], self._watch_backoff * 2))
                pause = min(self._watch_backoff, deadline - time.monotonic())
                if pause <= 0:
                    for watch in watches:
                        watch.cancel()
                    return
                time.sleep(pause)
            left = deadline - time.monotonic()
            if next_due is not None:
                # A watch fires on new work, not when scheduled work becomes due.
                left = min(left, next_due - time.time())
            if _wait_any(watches, left) is None:
                return
            # Fired: the next arm compares the counter with the value this watch was armed on,
            # in the same read (one transaction where a separate look and a new arm took two).
            fired_on[:] = [seen]

    def _first_dues(self, tr: Any, route: str, worker_id: str, after: float | None) -> list[float]:
        """The first due time of each of the route's due streams (later than ``after``, if given).
        Conflicting reads: a job enqueued while the caller commits makes it retry and see it."""
        streams = self._streams(route, worker_id, None)
        for level in self._levels(tr, route):  # one pair of streams per priority level
            streams += self._streams(route, worker_id, level)
        found = []
        for index, prefix, begin in streams:
            start = begin if after is None else index.pack((*prefix, after)) + b"\xff"
            for kv in tr.get_range(start, index.range(prefix).stop, limit=1):
                found.append(float(index.unpack(kv.key)[len(prefix)]))
        return found

    @_translate
    def wait_finished(self, job_id: str, timeout: float | None) -> JobRecord | None:
        deadline = None if timeout is None else time.monotonic() + timeout

        @fdb.transactional
        def look(tr: Any) -> tuple[_Stored | None, Any]:
            stored = self._read(tr, job_id)
            return stored, tr.watch(self._jobs.pack((job_id, "meta"))) if stored is not None else None

        backoff, last = 0.0, None
        while True:
            stored, watch = look(self._db)
            record = stored.record() if stored is not None else None
            left = None if deadline is None else deadline - time.monotonic()
            if record is None or record.finished_state or (left is not None and left <= 0):
                if watch is not None:
                    watch.cancel()
                return record
            if last is not None and stored is not None and stored.raw_meta == last:
                # Woken with nothing changed (a spurious fire, or an error): do not spin.
                backoff = min(WATCH_BACKOFF[1], max(WATCH_BACKOFF[0], backoff * 2))
                time.sleep(backoff if left is None else min(backoff, left))
            else:
                backoff = 0.0
            last = stored.raw_meta if stored is not None else None
            # A watch may miss a change that is undone at once; look again now and then.
            left = None if deadline is None else deadline - time.monotonic()
            _wait_any([watch], 5.0 if left is None else min(left, 5.0))


def _size(record: JobRecord) -> int:
    """About what storing ``record`` adds to a transaction (a dependent: also its parents' entries)."""
    return len(record.payload) + len(record.result or b"") + 1000 + 200 * len(record.parents or ())


def _fields(stored: _Stored | None) -> JobRecord | None:
    """A record read without its chunks (MalformedRecord if its fields are damaged), or None if gone."""
    return stored.record(fields_only=True) if stored is not None else None


def _payload_chunks(stored: _Stored) -> int:
    meta = stored.meta() or {}
    count = meta.get("payload")
    return count if isinstance(count, int) else 0


def _until(value: bytes) -> float:
    try:
        until = fdb.tuple.unpack(value)[0]
    except (ValueError, IndexError, TypeError):
        return 0.0  # not ours: treated as expired
    return float(until) if isinstance(until, (int, float)) else 0.0


def _raw(value: Any) -> bytes | None:
    return bytes(value) if value.present() else None


def _wait_any(watches: list[Any], timeout: float) -> Any | None:
    """Block until a watch fires or ``timeout`` passes; cancel them all; return the one that fired."""
    woken = threading.Event()
    fired: list[Any] = []

    def on_fire(future: Any) -> None:
        fired.append(future)
        woken.set()

    for watch in watches:
        watch.on_ready(on_fire)
    if timeout > 0:
        woken.wait(timeout)
    first = fired[0] if fired else None
    for watch in watches:
        watch.cancel()
    return first
