"""The FoundationDB backend: the Persistence protocol as FoundationDB transactions.

Every protocol step is one ``@fdb.transactional`` function, so it is atomic
and serializable, and FoundationDB's optimistic concurrency does the locking:
two workers claiming the same record both read it, and the second commit is
rejected (1020) and retried on fresh data. Keys are tuple-encoded under
``Subspace((db, queue))``::

    ("job", id, "meta")          JSON of the record without payload and result
    ("job", id, "payload", n)    the payload, in chunks below the 100 kB value limit
    ("job", id, "result", n)     the result, likewise
    ("job", id, "slot")          a pending record's key in the due index
    ("due", route, target, due, versionstamp, id)   claimable records, in claim order
    ("lease", lease_until, id)   running records, oldest lease first
    ("expire", expire_at, id)    finished records, deleted after result_ttl
    ("count", route, state)      record counts (atomic adds: no conflicts)
    ("wake", route)              bumped when work arrives; idle workers watch it
    ("worker", id)               the worker registry (JSON)

The due index ends in a versionstamp: ties between equal due times go in
commit order (within one enqueue, in the order given) without a shared
counter that every producer would conflict on. Its exact key is only known
after commit, so it is also written into the record's ``slot`` with
``set_versionstamped_value``.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from typing import Any, Callable, Sequence, TypeVar

import fdb
import fdb.tuple

from skunkqueue.errors import BackendUnavailable, MalformedRecord, PayloadTooLarge
from skunkqueue.persistence import LEASE_KILL, LEASE_LOST, LEASE_OK, Persistence, refuse_names_over
from skunkqueue.record import ERROR, FINISHED_STATES, PENDING, RUNNING, STATES, JobRecord, Outcome, WorkerInfo

API_VERSION = 710
# FoundationDB refuses values over 100 kB; blobs are split below that.
CHUNK = 90_000
# FoundationDB refuses transactions over 10 MB (and advises staying under 1 MB).
TRANSACTION_BUDGET = 9_000_000
# A transaction that cannot commit within this time (cluster down, endless
# conflicts) fails with 1031 instead of retrying forever.
DEFAULT_TIMEOUT_MS = 10_000
# Finished records deleted per housekeeping call: keeps that transaction small.
EXPIRE_BATCH = 100
MAX_NAME_BYTES = 2048  # per name: a due key holds the queue, route and target (10 kB key limit)
_COUNTER_ONE = (1).to_bytes(8, "little", signed=True)
_COUNTER_MINUS_ONE = (-1).to_bytes(8, "little", signed=True)
_SIZE_ERRORS = {2101, 2102, 2103}  # transaction_too_large, key_too_large, value_too_large

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
        self.slot: bytes | None = None

    def add(self, part: tuple[Any, ...], value: bytes) -> None:
        """Take in one of the record's keys (``part`` follows the id in the key)."""
        if part == ("meta",):
            self.raw_meta = value
        elif part[:1] == ("payload",):
            self.payload.append(value)
        elif part[:1] == ("result",):
            self.result.append(value)
        elif part == ("slot",):
            self.slot = value

    def meta(self) -> dict[str, Any] | None:
        """The stored fields, or None if they are not a JSON object."""
        try:
            data = json.loads(self.raw_meta) if self.raw_meta is not None else None
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def record(self) -> JobRecord:
        data = self.meta()
        if data is None:
            raise MalformedRecord(f"record {self.id!r} has no readable JSON fields")
        data = dict(data)
        if data.get("payload") != len(self.payload) or data.get("result") not in (None, len(self.result)):
            raise MalformedRecord(f"record {self.id!r} has missing or extra payload/result chunks")
        data["payload"] = b"".join(self.payload)
        data["result"] = None if data.get("result") is None else b"".join(self.result)
        return JobRecord.from_dict(data)


class FDBPersistence(Persistence):
    """A queue stored in FoundationDB. ``url`` is the cluster file, ``db`` the root name."""

    name = "fdb"
    # Payloads are split into chunks; 1 MB keeps a batch of them well inside a transaction.
    max_payload = 1_000_000
    notifies = True

    @classmethod
    def check_names(cls, queue: str, routes: Sequence[str] = ()) -> None:
        # Keys hold the queue, route and target names, and FoundationDB keys stop at 10,000 bytes.
        refuse_names_over(MAX_NAME_BYTES, cls.name, queue, routes)

    def __init__(self, queue: str, *, url: str | None = None, db: str | None = None,
                 **options: Any) -> None:
        timeout_ms = int(options.pop("timeout_ms", DEFAULT_TIMEOUT_MS))
        super().__init__(queue, url=url, db=db, **options)
        self.where = f"cluster file {url or '(default)'}"
        self.db = db or "skunkqueue"
        self._db = _open_database(url)
        self._db.options.set_transaction_timeout(timeout_ms)
        self.space = fdb.Subspace((self.db, queue))
        self._jobs = self.space["job"]
        self._due = self.space["due"]
        self._lease = self.space["lease"]
        self._expire = self.space["expire"]
        self._count = self.space["count"]
        self._wake = self.space["wake"]
        self._workers = self.space["worker"]

    # -- reading and writing one record (inside a transaction) ----------------------------

    def _read(self, tr: Any, job_id: str) -> _Stored | None:
        stored = _Stored(job_id)
        span = self._jobs.range((job_id,))
        for kv in tr.get_range(span.start, span.stop):
            stored.add(self._jobs.unpack(kv.key)[1:], kv.value)
        return None if stored.raw_meta is None and not stored.payload else stored

    def _unindex(self, tr: Any, stored: _Stored) -> None:
        """Take a record out of the indexes and counts of the state it is leaving."""
        if stored.slot is not None:
            tr.clear(stored.slot)
            tr.clear(self._jobs.pack((stored.id, "slot")))
        meta = stored.meta() or {}
        if meta.get("state") == RUNNING and isinstance(meta.get("lease_until"), (int, float)):
            tr.clear(self._lease.pack((float(meta["lease_until"]), stored.id)))
        if isinstance(meta.get("_expire"), (int, float)):
            tr.clear(self._expire.pack((float(meta["_expire"]), stored.id)))
        if isinstance(meta.get("route"), str) and meta.get("state") in STATES:
            tr.add(self._count.pack((meta["route"], meta["state"])), _COUNTER_MINUS_ONE)
        elif stored.slot is not None:
            # Damaged fields, but the slot proves it was a pending record we counted.
            tr.add(self._count.pack((self._due.unpack(stored.slot)[0], PENDING)), _COUNTER_MINUS_ONE)

    def _write(self, tr: Any, record: JobRecord, *, payload: bool = False, result: bool = False,
               position: int = 0) -> None:
        """Store ``record`` and put it in the indexes of its state (the old ones are already gone)."""
        data = record.to_dict()
        blob, outcome = data.pop("payload"), data.pop("result")
        data["payload"] = len(_chunks(blob))
        data["result"] = None if outcome is None else len(_chunks(outcome))
        data["_expire"] = None
        if record.state in FINISHED_STATES:
            data["_expire"] = (record.finished or time.time()) + self.result_ttl
            tr[self._expire.pack((data["_expire"], record.id))] = b""
        elif record.state == RUNNING and record.lease_until is not None:
            tr[self._lease.pack((float(record.lease_until), record.id))] = b""
        elif record.state == PENDING:
            slot = self._due.pack_with_versionstamp(
                (record.route, record.target or "", float(record.due),
                 fdb.tuple.Versionstamp(user_version=position), record.id))
            tr.set_versionstamped_key(slot, b"")
            tr.set_versionstamped_value(self._jobs.pack((record.id, "slot")), slot)
            tr.add(self._wake.pack((record.route,)), _COUNTER_ONE)
        tr[self._jobs.pack((record.id, "meta"))] = json.dumps(data, separators=(",", ":")).encode()
        if payload:
            for n, chunk in enumerate(_chunks(blob)):
                tr[self._jobs.pack((record.id, "payload", n))] = chunk
        if result:
            span = self._jobs.range((record.id, "result"))
            tr.clear_range(span.start, span.stop)
            for n, chunk in enumerate(_chunks(outcome or b"")):
                tr[self._jobs.pack((record.id, "result", n))] = chunk
        tr.add(self._count.pack((record.route, record.state)), _COUNTER_ONE)

    def _delete(self, tr: Any, stored: _Stored) -> None:
        self._unindex(tr, stored)
        span = self._jobs.range((stored.id,))
        tr.clear_range(span.start, span.stop)

    def _quarantine(self, tr: Any, stored: _Stored, route: str, why: str) -> None:
        # Keep the damaged bytes for inspection, but take the record out of every route.
        self._unindex(tr, stored)
        now = time.time()
        data = {"id": stored.id, "queue": self.queue, "route": route, "state": ERROR, "dead": True,
                "finished": now, "_expire": now + self.result_ttl,
                "error": {"type": "MalformedRecord", "message": why, "traceback": ""},
                "_damaged": (stored.raw_meta or b"")[:2000].decode("utf-8", "replace")}
        tr[self._jobs.pack((stored.id, "meta"))] = json.dumps(data).encode()
        tr[self._expire.pack((data["_expire"], stored.id))] = b""
        tr.add(self._count.pack((route, ERROR)), _COUNTER_ONE)

    # -- producers ----------------------------------------------------------------------------

    @_translate
    def enqueue(self, records: Sequence[JobRecord]) -> None:
        size = sum(len(r.payload) + len(r.result or b"") + 1000 for r in records)
        if size > TRANSACTION_BUDGET or len(records) > 0xFFFF:
            raise PayloadTooLarge(
                f"These {len(records)} jobs take about {size} bytes; one FoundationDB transaction "
                f"holds at most {TRANSACTION_BUDGET} (and 65535 jobs). Fire them in smaller batches."
            )

        @fdb.transactional
        def store(tr: Any) -> None:
            for position, record in enumerate(records):
                self._write(tr, record, payload=True, result=record.result is not None, position=position)

        store(self._db)

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

    def _scan(self, page: int = 2000) -> list[_Stored]:
        """Every record of the queue, a page per transaction (one transaction must stay under 5 s)."""
        begin, end = self._jobs.range().start, self._jobs.range().stop
        everything: list[_Stored] = []
        while True:
            kvs = fdb.transactional(lambda tr, b=begin: list(tr.snapshot.get_range(b, end, limit=page)))(self._db)
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
                everything.append(stored)
            if not full:
                return everything

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
        span = self._due.range((route,) if target is None else (route, target))

        @fdb.transactional
        def purge_some(tr: Any) -> tuple[int, bool]:
            entries = list(tr.snapshot.get_range(span.start, span.stop, limit=200))
            deleted = 0
            for kv in entries:
                job_id = self._due.unpack(kv.key)[-1]
                stored = self._read(tr, job_id)
                meta = stored.meta() if stored else None
                if stored is None or stored.slot != kv.key:
                    tr.clear(kv.key)  # an entry left behind by something else: drop it
                elif meta is None or meta.get("state") == PENDING:
                    self._delete(tr, stored)
                    deleted += 1
            return deleted, len(entries) == 200

        total, more = 0, True
        while more:
            deleted, more = purge_some(self._db)
            total += deleted
        return total

    @_translate
    def request_kill(self, job_id: str) -> bool:
        @fdb.transactional
        def flag(tr: Any) -> bool:
            stored = self._read(tr, job_id)
            if stored is None:
                return False
            try:
                record = stored.record()
            except MalformedRecord:
                return False
            if record.state != RUNNING:
                return False
            record.kill_requested = True
            self._unindex(tr, stored)
            self._write(tr, record)
            return True

        return flag(self._db)

    # -- workers --------------------------------------------------------------------------------

    @_translate
    def claim(self, route: str, worker_id: str, lease: float, limit: int = 1) -> list[JobRecord]:
        @fdb.transactional
        def take(tr: Any) -> list[JobRecord]:
            now = time.time()
            candidates: list[tuple[bytes, bytes, str]] = []
            for target in ("", worker_id):
                prefix = self._due.pack((route, target))
                # A snapshot read: a producer adding work must not abort this claim.
                # What makes the claim exclusive is the normal read of each record below.
                for kv in tr.snapshot.get_range(prefix, self._due.pack((route, target, now)) + b"\xff",
                                                limit=limit):
                    candidates.append((kv.key[len(prefix):], kv.key, self._due.unpack(kv.key)[-1]))
            candidates.sort()
            claimed = []
            for _order, key, job_id in candidates[:limit]:
                stored = self._read(tr, job_id)
                if stored is None or stored.slot != key:
                    tr.clear(key)  # stale or foreign index entry
                    continue
                try:
                    record = stored.record()
                except MalformedRecord as exc:
                    self._quarantine(tr, stored, route, str(exc))
                    continue
                self._unindex(tr, stored)
                record.claim_by(worker_id, now, lease)
                self._write(tr, record)
                claimed.append(record)
            return claimed

        return take(self._db)

    @_translate
    def renew(self, worker_id: str, leases: Sequence[tuple[str, int]], lease: float) -> dict[str, str]:
        @fdb.transactional
        def extend(tr: Any) -> dict[str, str]:
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
            return statuses

        return extend(self._db)

    @_translate
    def finish(self, job_id: str, token: int, outcome: Outcome, *, expect: str = RUNNING) -> bool:
        @fdb.transactional
        def apply(tr: Any) -> bool:
            stored = self._read(tr, job_id)
            if stored is None:
                return False
            record = stored.record()
            if record.state != expect or record.token != token:
                return False
            self._unindex(tr, stored)
            self._write(tr, outcome.apply_to(record, time.time()), result=True)
            return True

        return apply(self._db)

    @_translate
    def expired_leases(self, now: float, limit: int = 100) -> list[JobRecord]:
        # Runs about once a second per worker: often enough to also delete
        # finished records past their time to live, a bounded batch at a time.
        now = float(now)  # the tuple layer orders ints and floats apart
        self._delete_expired(now)

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

    def _delete_expired(self, now: float) -> None:
        @fdb.transactional
        def delete(tr: Any) -> None:
            for kv in tr.snapshot.get_range(self._expire.range().start, self._expire.pack((now,)),
                                            limit=EXPIRE_BATCH):
                expire_at, job_id = self._expire.unpack(kv.key)
                stored = self._read(tr, job_id)
                meta = stored.meta() if stored else None
                if stored is not None and meta is not None and meta.get("_expire") == expire_at:
                    self._delete(tr, stored)
                else:
                    tr.clear(kv.key)  # the record was requeued or deleted since

        delete(self._db)

    @_translate
    def register_worker(self, info: WorkerInfo) -> None:
        @fdb.transactional
        def register(tr: Any) -> None:
            tr[self._workers.pack((info.id,))] = json.dumps(info.to_dict()).encode()

        register(self._db)

    @_translate
    def heartbeat(self, worker_id: str, state: str) -> bool:
        @fdb.transactional
        def beat(tr: Any) -> bool:
            key = self._workers.pack((worker_id,))
            value = tr[key]
            if not value.present():
                return False
            info = json.loads(bytes(value))
            info.update(state=state, last_seen=time.time())
            tr[key] = json.dumps(info).encode()
            return True

        return beat(self._db)

    @_translate
    def unregister_worker(self, worker_id: str) -> None:
        @fdb.transactional
        def unregister(tr: Any) -> None:
            del tr[self._workers.pack((worker_id,))]

        unregister(self._db)

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
    def wait_for_work(self, routes: Sequence[str], worker_id: str, timeout: float) -> None:
        @fdb.transactional
        def arm(tr: Any) -> tuple[float | None, list[Any]]:
            next_due = None
            for route in routes:
                for target in ("", worker_id):
                    span = self._due.range((route, target))
                    for kv in tr.snapshot.get_range(span.start, span.stop, limit=1):
                        due = self._due.unpack(kv.key)[2]
                        next_due = due if next_due is None else min(next_due, due)
            return next_due, [tr.watch(self._wake.pack((route,))) for route in routes]

        next_due, watches = arm(self._db)
        if next_due is not None:
            # A watch fires on new work, not when scheduled work becomes due.
            timeout = min(timeout, next_due - time.time())
        _wait_any(watches, timeout)

    @_translate
    def wait_finished(self, job_id: str, timeout: float | None) -> JobRecord | None:
        deadline = None if timeout is None else time.monotonic() + timeout

        @fdb.transactional
        def look(tr: Any) -> tuple[_Stored | None, Any]:
            stored = self._read(tr, job_id)
            return stored, tr.watch(self._jobs.pack((job_id, "meta"))) if stored is not None else None

        while True:
            stored, watch = look(self._db)
            record = stored.record() if stored is not None else None
            left = None if deadline is None else deadline - time.monotonic()
            if record is None or record.finished_state or (left is not None and left <= 0):
                if watch is not None:
                    watch.cancel()
                return record
            # A watch may miss a change that is undone at once; look again now and then.
            _wait_any([watch], 5.0 if left is None else min(left, 5.0))


def _wait_any(watches: list[Any], timeout: float) -> None:
    """Block until a watch fires or ``timeout`` passes; then cancel them all."""
    woken = threading.Event()
    for watch in watches:
        watch.on_ready(lambda _future: woken.set())
    if timeout > 0:
        woken.wait(timeout)
    for watch in watches:
        watch.cancel()
