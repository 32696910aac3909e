"""The client half of the FoundationDB STAND-IN (see ../standin_server.py). Not FoundationDB.

It mirrors the parts of the real ``fdb.impl`` API that skunkqueue_fdb uses,
with the real semantics where they matter to a queue: read-your-writes,
read conflict ranges only for non-snapshot reads, errors surfacing at commit
with the real codes, ``on_error`` retrying the retryable ones with back-off,
watches that fire once the key's value differs from the one the watching
transaction saw, and the client-side limits (key 10 kB, value 100 kB,
transaction 10 MB, timeout option, 10,000 watches per database), the
unreadable versionstamped keys and values (1036), and range reads that arrive
in batches, so the five-second limit applies during a long read. Faults a real
cluster shows (commit_unknown_result, timeouts at commit, transaction_too_old,
spurious watches) and per-request latency are armed in ``standin_faults``.
Everything is synchronous, futures already resolved when returned, except
watches and point reads: as the real client sends a read at once and answers
it later, the reads a transaction sends before it looks at any answer travel
in one request, so ten thousand of them cost one round trip, not ten thousand.
"""

from __future__ import annotations

import bisect
import builtins
import functools
import inspect
import os
import random
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterator

from fdb.standin_faults import COMMIT_KINDS, FAULTS, READ_KINDS

KEY_LIMIT = 10_000
VALUE_LIMIT = 100_000
TRANSACTION_LIMIT = 10_000_000
# The real client streams a range read in batches of growing size; each batch
# is a request at the transaction's read version, checked against the MVCC window.
RANGE_BATCH_ROWS = 500

_DESCRIPTIONS = {
    1007: "Transaction is too old to perform reads or be committed",
    1009: "Request for future version",
    1020: "Transaction not committed due to conflict with another transaction",
    1021: "Transaction may or may not have committed",
    1025: "Operation aborted because the transaction was cancelled",
    1031: "Operation aborted because the transaction timed out",
    1032: "Too many watches currently set",
    1036: "Read or wrote an unreadable key",
    1101: "Asynchronous operation cancelled",
    2000: "Client tried to use an invalid argument",
    2101: "Transaction exceeds byte limit",
    2102: "Key length exceeds limit",
    2103: "Value length exceeds limit",
    2104: "Connection string invalid",
}
_RETRYABLE = frozenset({1007, 1009, 1020, 1021, 1037})


class FDBError(Exception):
    """Same shape as the real one: ``code``, ``description``, ``str`` = "description (code)"."""

    def __init__(self, code: int) -> None:
        self.code = code

    @property
    def description(self) -> str:
        return _DESCRIPTIONS.get(self.code, "Unknown error")

    def __str__(self) -> str:
        return f"{self.description} ({self.code})"

    def __repr__(self) -> str:
        return f"FDBError({self.code})"


# -- futures --------------------------------------------------------------------------


class Future:
    Event = threading.Event

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[Future], None]] = []
        self._error: FDBError | None = None
        self._result: Any = None

    def _resolve(self, result: Any = None, error: FDBError | None = None) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._result, self._error = result, error
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:  # the real binding also discards callback errors
                sys.stderr.write("Discarding uncaught exception from user FDB callback\n")

    def wait(self) -> Any:
        self._event.wait()
        if self._error is not None:
            raise self._error
        return self._result

    def is_ready(self) -> bool:
        return self._event.is_set()

    def block_until_ready(self) -> None:
        self._event.wait()

    def on_ready(self, callback: Callable[[Future], None]) -> None:
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback(self)

    def cancel(self) -> None:
        self._resolve(error=FDBError(1101))

    @staticmethod
    def wait_for_any(*futures: Future) -> int:
        ready = threading.Event()
        for future in futures:
            future.on_ready(lambda _f: ready.set())
        ready.wait()
        return next(i for i, f in enumerate(futures) if f.is_ready())


def _done(result: Any = None) -> Future:
    future = Future()
    future._resolve(result)
    return future


class Value(Future):
    """A read key's value (None when absent), like the real lazy ``fdb.impl.Value``."""

    def __init__(self, value: bytes | None) -> None:
        super().__init__()
        self.value = value
        self._resolve(self)

    def present(self) -> bool:
        return self.value is not None

    def __bytes__(self) -> bytes:
        if self.value is None:
            raise ValueError("value not present")
        return self.value

    def __eq__(self, other: object) -> bool:
        return self.value == (other.value if isinstance(other, Value) else other)

    def __hash__(self) -> int:
        return hash(self.value)


class _InFlight(Value):
    """A point read sent but not yet answered: its answer comes with the others in flight."""

    def __init__(self, tr: Transaction, key: bytes, atomics: list[bytes]) -> None:
        Future.__init__(self)
        self._tr, self._key, self._pending_atomics = tr, key, atomics
        self._answer: bytes | None = None

    @property  # type: ignore[override]
    def value(self) -> bytes | None:
        self.wait()
        return self._answer

    def _answered(self, value: bytes | None) -> None:
        for param in self._pending_atomics:  # adds made before the read was sent
            value = _add(value, param)
        self._answer = value
        self._resolve(self)

    def wait(self) -> Any:
        if not self.is_ready():
            self._tr._answer_reads()
        return super().wait()

    def block_until_ready(self) -> None:
        self.wait()

    def on_ready(self, callback: Callable[[Future], None]) -> None:
        if not self.is_ready():
            self._tr._answer_reads()
        super().on_ready(callback)

    def __repr__(self) -> str:
        return repr(self.value)


class KeyValue:
    def __init__(self, key: bytes, value: bytes) -> None:
        self.key = key
        self.value = value

    def __iter__(self) -> Iterator[bytes]:
        return iter((self.key, self.value))

    def __repr__(self) -> str:
        return f"{self.key!r}: {self.value!r}"


class _Range:
    """What a transaction's range read returns: like the real ``FDBRange``, it can be iterated
    and turned into a list, but has no length and is always true (unlike a list). Unlike the
    real one, it reads at once rather than as it is iterated."""

    def __init__(self, rows: list[KeyValue]) -> None:
        self._rows = rows

    def __iter__(self) -> Iterator[KeyValue]:
        return iter(self._rows)

    def to_list(self) -> list[KeyValue]:
        return list(self._rows)


# -- the connection ------------------------------------------------------------------------


def _key(key: Any) -> bytes:
    if hasattr(key, "as_foundationdb_key"):
        key = key.as_foundationdb_key()
    if not isinstance(key, bytes):
        raise TypeError("Key must be of type bytes")
    return key


def _value(value: Any) -> bytes:
    if hasattr(value, "as_foundationdb_value"):
        value = value.as_foundationdb_value()
    if not isinstance(value, bytes):
        raise TypeError("Value must be of type bytes")
    return value


def _strinc(key: bytes) -> bytes:
    key = key.rstrip(b"\xff")
    if not key:
        raise ValueError("Key must contain at least one byte not equal to 0xFF")
    return key[:-1] + bytes([key[-1] + 1])


class _Connection:
    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.sock: socket.socket | None = None

    def request(self, deadline: float | None, *message: Any) -> Any:
        from standin_server import recv_message, send_message  # same directory, on sys.path

        # A real client keeps retrying an unreachable cluster until the
        # transaction times out (forever without a timeout; here: a minute).
        give_up = deadline if deadline is not None else time.monotonic() + 60
        FAULTS.count("requests")
        if FAULTS.request_latency and message[0] != "watch":
            time.sleep(FAULTS.request_latency)
        while True:
            try:
                if self.sock is None:
                    self.sock = socket.create_connection(self.address, timeout=5)
                    self.sock.settimeout(None)
                    self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                send_message(self.sock, message)
                reply = recv_message(self.sock)
                if reply is None:
                    raise ConnectionError("stand-in server closed the connection")
                break
            except OSError:
                if self.sock is not None:
                    self.sock.close()
                    self.sock = None
                if time.monotonic() >= give_up:
                    raise FDBError(1031) from None
                time.sleep(0.1)
        status, payload = reply
        if status == "error":
            raise FDBError(payload)
        return payload


# -- options ----------------------------------------------------------------------------------


class _TransactionOptions:
    def __init__(self, tr: Transaction) -> None:
        self._tr = tr

    def set_timeout(self, milliseconds: int) -> None:
        self._tr._timeout = milliseconds / 1000 if milliseconds else None

    def set_retry_limit(self, limit: int) -> None:
        self._tr._retry_limit = limit

    def set_max_retry_delay(self, milliseconds: int) -> None:
        self._tr._max_delay = milliseconds / 1000


class _DatabaseOptions:
    def __init__(self, db: Database) -> None:
        self._db = db

    def set_transaction_timeout(self, milliseconds: int) -> None:
        self._db._timeout = milliseconds / 1000 if milliseconds else None

    def set_transaction_retry_limit(self, limit: int) -> None:
        self._db._retry_limit = limit


# -- transactions -----------------------------------------------------------------------------


class TransactionRead:
    def __init__(self, tr: Transaction, snapshot: bool) -> None:
        self._tr = tr
        self._snapshot = snapshot

    def get_read_version(self) -> Future:
        return _done(self._tr._read_version())

    def get(self, key: Any) -> Value:
        return self._tr._send_read(_key(key), self._snapshot)

    def get_range(self, begin: Any, end: Any, limit: int = 0, reverse: bool = False,
                  streaming_mode: Any = None) -> _Range:
        begin = b"" if begin is None else _key(begin)
        end = b"\xff" if end is None else _key(end)
        return _Range([KeyValue(k, v) for k, v in self._tr._get_range(begin, end, limit, reverse, self._snapshot)])

    def get_range_startswith(self, prefix: Any, *args: Any, **kwargs: Any) -> _Range:
        prefix = _key(prefix)
        return self.get_range(prefix, _strinc(prefix), *args, **kwargs)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            return self.get_range(key.start, key.stop, reverse=(key.step == -1))
        return self.get(key)


class Transaction(TransactionRead):
    def __init__(self, db: Database) -> None:
        super().__init__(self, False)
        self.db = db
        self.options = _TransactionOptions(self)
        self.snapshot = TransactionRead(self, True)
        self._timeout = db._timeout
        self._retry_limit = db._retry_limit
        self._max_delay = 1.0
        self._created = time.monotonic()
        self._retries = 0
        self._backoff = 0.01
        self._reset_state()

    def _reset_state(self) -> None:
        for read in getattr(self, "_in_flight", ()):
            read._resolve(error=FDBError(1025))  # as the real client cancels a reset's reads
        self._in_flight: list[_InFlight] = []
        self._rv: int | None = None
        self._mutations: list[tuple[Any, ...]] = []
        self._writes: dict[bytes, bytes | None] = {}     # what this transaction set or cleared
        self._cleared: list[tuple[bytes, bytes]] = []
        self._atomics: dict[bytes, list[bytes]] = {}     # pending adds, applied over the read value
        self._touched: list[bytes] = []                  # every key set, cleared or added, sorted
        self._touched_set: set[bytes] = set()
        self._reads: list[tuple[bytes, bytes]] = []
        self._extra_writes: list[tuple[bytes, bytes]] = []
        self._watches: list[tuple[Future, bytes, bytes | None]] = []
        # Versionstamped writes, unknown until commit: values by key; keys as the spans their stamp
        # may produce, by the prefix before the stamp (a span holds only keys with its prefix).
        self._unreadable: set[bytes] = set()
        self._stamped: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self._versionstamp = Future()

    # -- plumbing --------------------------------------------------------------------------

    def _deadline(self) -> float | None:
        return None if self._timeout is None else self._created + self._timeout

    def _check_timeout(self) -> None:
        deadline = self._deadline()
        if deadline is not None and time.monotonic() > deadline:
            raise FDBError(1031)

    def _call(self, *message: Any) -> Any:
        self._check_timeout()
        return self.db._connection().request(self._deadline(), *message)

    def _read_version(self) -> int:
        if self._rv is None:
            self._rv = self._call("read_version")
        return self._rv

    def _local(self, key: bytes) -> tuple[bool, bytes | None]:
        """(known locally, value) from this transaction's own sets and clears."""
        if key in self._writes:
            return True, self._writes[key]
        if any(b <= key < e for b, e in self._cleared):
            return True, None
        return False, None

    def _with_atomics(self, key: bytes, value: bytes | None) -> bytes | None:
        for param in self._atomics.get(key, ()):
            value = _add(value, param)
        return value

    # -- reads ------------------------------------------------------------------------------

    def _check_readable(self, begin: bytes, end: bytes) -> None:
        if end == begin + b"\x00":  # one key: only the spans under its own prefixes can hold it
            if begin in self._unreadable or any(
                    b <= begin < e for n in range(len(begin) + 1) for b, e in self._stamped.get(begin[:n], ())):
                raise FDBError(1036)
            return
        if any(begin <= key < end for key in self._unreadable) or any(
                b < end and begin < e for spans in self._stamped.values() for b, e in spans):
            raise FDBError(1036)

    def _inject_read_fault(self, begin: bytes) -> None:
        if FAULTS.rules and FAULTS.pick(READ_KINDS, [begin]):
            raise FDBError(1007)

    def _send_read(self, key: bytes, snapshot: bool) -> Value:
        self._check_readable(key, key + b"\x00")
        self._inject_read_fault(key)
        known, value = self._local(key)
        if known:
            return Value(self._with_atomics(key, value))
        if not snapshot:
            self._reads.append((key, key + b"\x00"))
        read = _InFlight(self, key, list(self._atomics.get(key, ())))
        self._in_flight.append(read)
        return read

    def _answer_reads(self) -> None:
        reads, self._in_flight = self._in_flight, []
        if not reads:
            return
        try:
            values = self._call("get_many", self._read_version(), [read._key for read in reads])
        except FDBError as exc:
            for read in reads:
                read._resolve(error=exc)
            return
        for read, value in zip(reads, values):
            read._answered(value)

    def _get_range(self, begin: bytes, end: bytes, limit: int, reverse: bool,
                   snapshot: bool) -> list[tuple[bytes, bytes]]:
        self._check_readable(begin, end)
        self._inject_read_fault(begin)
        local = bool(self._local_keys(begin, end)) or any(b < end and begin < e for b, e in self._cleared)
        remote = self._remote_range(begin, end, 0 if local else limit, reverse)
        if local:
            merged = {k: v for k, v in remote if not self._local(k)[0]}
            for k in self._local_keys(begin, end):
                known, v = self._local(k)
                merged[k] = self._with_atomics(k, v if known else merged.get(k))
            remote = sorted(((k, v) for k, v in merged.items() if v is not None), reverse=reverse)
            if limit:
                remote = remote[:limit]
        if not snapshot:
            # Like FoundationDB: a limited read conflicts only on the part it actually covered.
            if limit and len(remote) == limit:
                edge = remote[-1][0]
                self._reads.append((edge, end) if reverse else (begin, edge + b"\x00"))
            else:
                self._reads.append((begin, end))
        return remote

    def _remote_range(self, begin: bytes, end: bytes, limit: int, reverse: bool) -> list[tuple[bytes, bytes]]:
        """The stored rows, fetched a batch per request as the real client streams them."""
        out: list[tuple[bytes, bytes]] = []
        while True:
            want = RANGE_BATCH_ROWS if not limit else min(RANGE_BATCH_ROWS, limit - len(out))
            batch = self._call("get_range", self._read_version(), begin, end, want, reverse)
            out += batch
            if len(batch) < want or (limit and len(out) >= limit):
                return out
            if reverse:
                end = batch[-1][0]
            else:
                begin = batch[-1][0] + b"\x00"

    # -- writes -----------------------------------------------------------------------------

    def _touch(self, key: bytes) -> None:
        if key not in self._touched_set:
            self._touched_set.add(key)
            bisect.insort(self._touched, key)

    def _local_keys(self, begin: bytes, end: bytes) -> list[bytes]:
        """The keys in [begin, end) this transaction set or added (a clear counts as a set)."""
        span = self._touched[bisect.bisect_left(self._touched, begin):bisect.bisect_left(self._touched, end)]
        return [k for k in span if k in self._writes or k in self._atomics]

    def set(self, key: Any, value: Any) -> None:
        key, value = _key(key), _value(value)
        self._touch(key)
        self._readable_again(key)
        self._mutations.append(("set", key, value))
        self._writes[key] = value
        self._atomics.pop(key, None)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.set(key, value)

    def clear(self, key: Any) -> None:
        key = _key(key)
        self._touch(key)
        self._readable_again(key)
        self._mutations.append(("clear", key))
        self._writes[key] = None
        self._atomics.pop(key, None)

    def clear_range(self, begin: Any, end: Any) -> None:
        begin = b"" if begin is None else _key(begin)
        end = b"\xff" if end is None else _key(end)
        self._mutations.append(("clear_range", begin, end))
        for key in self._local_keys(begin, end):
            self._writes.pop(key, None)
            self._atomics.pop(key, None)
        self._cleared.append((begin, end))

    def _readable_again(self, key: bytes) -> None:
        # A plain set or clear after a versionstamped value makes the key's value known again.
        self._unreadable.discard(key)

    def clear_range_startswith(self, prefix: Any) -> None:
        prefix = _key(prefix)
        self.clear_range(prefix, _strinc(prefix))

    def __delitem__(self, key: Any) -> None:
        if isinstance(key, slice):
            self.clear_range(key.start, key.stop)
        else:
            self.clear(key)

    def add(self, key: Any, param: Any) -> None:
        key, param = _key(key), _value(param)
        self._touch(key)
        self._mutations.append(("add", key, param))
        if key in self._writes:
            self._writes[key] = _add(self._writes[key], param)
        else:
            self._atomics.setdefault(key, []).append(param)

    def set_versionstamped_key(self, key: Any, param: Any) -> None:
        key = _key(key)
        self._mutations.append(("versionstamped_key", key, _value(param)))
        # As FoundationDB does: the final key is unknown until commit, so every key the
        # stamp could produce (from this read version's stamp to 0xff * 10) is a write
        # conflict range, and unreadable in this transaction.
        offset = int.from_bytes(key[-4:], "little")
        body = key[:-4]
        begin = body[:offset] + (self._rv or 0).to_bytes(8, "big") + b"\x00\x00" + body[offset + 10:]
        end = min(body[:offset] + b"\xff" * 10 + body[offset + 10:] + b"\x00", b"\xff")
        self._extra_writes.append((begin, end))
        self._stamped.setdefault(body[:offset], []).append((begin, end))

    def set_versionstamped_value(self, key: Any, param: Any) -> None:
        key = _key(key)
        self._mutations.append(("versionstamped_value", key, _value(param)))
        self._writes.pop(key, None)
        self._atomics.pop(key, None)
        self._unreadable.add(key)

    def add_read_conflict_range(self, begin: Any, end: Any) -> None:
        self._reads.append((_key(begin), _key(end)))

    def add_read_conflict_key(self, key: Any) -> None:
        key = _key(key)
        self._reads.append((key, key + b"\x00"))

    def add_write_conflict_range(self, begin: Any, end: Any) -> None:
        self._extra_writes.append((_key(begin), _key(end)))

    def add_write_conflict_key(self, key: Any) -> None:
        key = _key(key)
        self._extra_writes.append((key, key + b"\x00"))

    def watch(self, key: Any) -> Future:
        key = _key(key)
        # The watch compares against what this transaction would read now.
        known, value = self._local(key)
        if not known:
            value = self._call("get", self._read_version(), key)
        future = Future()
        self._watches.append((future, key, self._with_atomics(key, value)))
        return future

    def get_versionstamp(self) -> Future:
        return self._versionstamp

    # -- commit and retry --------------------------------------------------------------------

    def _check_limits(self) -> None:
        size = 0
        for op, key, *rest in self._mutations:
            raw_key = key[:-4] if op == "versionstamped_key" else key
            if len(raw_key) > KEY_LIMIT:
                raise FDBError(2102)
            if op in ("set", "add", "versionstamped_key", "versionstamped_value"):
                value = rest[0][:-4] if op == "versionstamped_value" else rest[0]
                if len(value) > VALUE_LIMIT:
                    raise FDBError(2103)
                size += len(value)
            size += len(key) + sum(len(r) for r in rest[:1] if op == "clear_range")
        size += sum(len(b) + len(e) for b, e in self._reads + self._extra_writes)
        if size > TRANSACTION_LIMIT:
            raise FDBError(2101)

    def commit(self) -> Future:
        try:
            self._check_timeout()
            self._check_limits()
            if self._mutations or self._extra_writes:
                fault = FAULTS.pick(COMMIT_KINDS, [m[1] for m in self._mutations]) if FAULTS.rules else None
                if fault is not None and fault.startswith("fail_"):
                    raise FDBError(int(fault[-4:]))
                if FAULTS.commit_latency:
                    time.sleep(FAULTS.commit_latency)
                FAULTS.count("commits")
                try:
                    _version, stamp = self._call("commit", self._read_version(), self._reads, self._mutations,
                                                 self._extra_writes)
                except FDBError as exc:
                    if exc.code == 1020:
                        FAULTS.count("conflicts")
                    raise
                if fault is not None:  # applied, but the client never heard
                    raise FDBError(int(fault[-4:]))
                self._versionstamp._resolve(stamp)
            else:  # read-only: nothing to resolve, as in FoundationDB
                self._versionstamp._resolve(error=FDBError(2000))
        except FDBError as exc:
            for future, *_ in self._watches:
                future._resolve(error=exc)
            self._watches = []
            return _failed(exc)
        for future, key, expected in self._watches:
            self.db._start_watch(future, key, expected)
        self._watches = []
        return _done()

    def on_error(self, error: Any) -> Future:
        code = error.code if isinstance(error, FDBError) else error
        if not isinstance(code, int):
            raise error
        if code not in _RETRYABLE:
            return _failed(FDBError(code))
        self._retries += 1
        if self._retry_limit is not None and self._retries > self._retry_limit:
            return _failed(FDBError(code))
        delay = self._backoff * random.random()
        deadline = self._deadline()
        if deadline is not None and time.monotonic() + delay > deadline:
            return _failed(FDBError(1031))
        time.sleep(delay)
        self._backoff = min(self._backoff * 2, self._max_delay)
        self._cancel_watches()
        self._reset_state()
        return _done()

    def _cancel_watches(self) -> None:
        for future, *_ in self._watches:
            future._resolve(error=FDBError(1025))

    def reset(self) -> None:
        self._cancel_watches()
        self._created = time.monotonic()
        self._retries, self._backoff = 0, 0.01
        self._reset_state()

    def cancel(self) -> None:
        self._cancel_watches()
        self._reset_state()


def _failed(error: FDBError) -> Future:
    future = Future()
    future._resolve(error=error)
    return future


def _add(value: bytes | None, param: bytes) -> bytes:
    old = (value or b"")[:len(param)].ljust(len(param), b"\x00")
    total = int.from_bytes(old, "little") + int.from_bytes(param, "little")
    return (total % (1 << (8 * len(param)))).to_bytes(len(param), "little")


# -- the database -------------------------------------------------------------------------------


class Database:
    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.options = _DatabaseOptions(self)
        self._timeout: float | None = None
        self._retry_limit: int | None = None
        self._local = threading.local()
        self._watch_lock = threading.Lock()
        self._active_watches = 0

    def _connection(self) -> _Connection:
        # Backends in several threads share this Database (fdb.open caches it);
        # a connection per thread keeps their requests apart.
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _Connection(self.address)
        return conn

    def create_transaction(self) -> Transaction:
        return Transaction(self)

    def _start_watch(self, future: Future, key: bytes, expected: bytes | None) -> None:
        with self._watch_lock:
            if self._active_watches >= FAULTS.watch_limit:
                future._resolve(error=FDBError(1032))
                return
            self._active_watches += 1

        def done(_future: Future) -> None:
            with self._watch_lock:
                self._active_watches -= 1

        future.on_ready(done)
        if FAULTS.spurious():
            # Real watches may fire without a change (or with an error); callers must re-check.
            FAULTS.count("spurious_watches")
            error = FAULTS.spurious_watch_error
            threading.Timer(FAULTS.rng.random() * 0.01, future._resolve,
                            kwargs={"error": FDBError(error) if error else None}).start()
            return

        def wait() -> None:
            conn = _Connection(self.address)
            try:
                # Cancelling the future closes the socket, which ends the server's wait.
                future.on_ready(lambda _f: _shutdown(conn))
                if not future.is_ready():
                    conn.request(None, "watch", key, expected)
                future._resolve()
            except FDBError as exc:
                future._resolve(error=exc)
            finally:
                _shutdown(conn)

        threading.Thread(target=wait, name="fdb-standin-watch", daemon=True).start()

    def __getitem__(self, key: Any) -> Any:
        return _run(self, lambda tr: tr[key])

    def get(self, key: Any) -> Value:
        return _run(self, lambda tr: tr.get(key))

    def get_range(self, begin: Any, end: Any, limit: int = 0, reverse: bool = False) -> list[KeyValue]:
        return _run(self, lambda tr: tr.get_range(begin, end, limit, reverse).to_list())

    def set(self, key: Any, value: Any) -> None:
        _run(self, lambda tr: tr.set(key, value))

    def __setitem__(self, key: Any, value: Any) -> None:
        self.set(key, value)

    def clear(self, key: Any) -> None:
        _run(self, lambda tr: tr.clear(key))

    def clear_range(self, begin: Any, end: Any) -> None:
        _run(self, lambda tr: tr.clear_range(begin, end))

    def add(self, key: Any, param: Any) -> None:
        _run(self, lambda tr: tr.add(key, param))


def _shutdown(conn: _Connection) -> None:
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _run(db: Database, func: Callable[[Transaction], Any]) -> Any:
    tr = db.create_transaction()
    while True:
        try:
            result = func(tr)
            tr.commit().wait()
            return result
        except FDBError as exc:
            tr.on_error(exc.code).wait()


def transactional(*tr_args: Any, **tr_kwargs: Any) -> Any:
    """The real decorator's contract: a Database gets a fresh transaction, committed and
    retried through ``on_error``; a Transaction is passed through uncommitted."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        parameter = tr_kwargs.get("parameter", "tr")
        index = inspect.getfullargspec(inspect.unwrap(func)).args.index(parameter)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if inspect.isgeneratorfunction(func):
                raise ValueError("Generators can not be wrapped with fdb.transactional")
            if isinstance(args[index], TransactionRead):
                return func(*args, **kwargs)
            largs = list(args)
            tr = largs[index] = args[index].create_transaction()
            while True:
                try:
                    ret = func(*largs, **kwargs)
                    tr.commit().wait()
                    return ret
                except FDBError as exc:
                    tr.on_error(exc.code).wait()

        return wrapper

    if tr_args:
        if len(tr_args) != 1 or not callable(tr_args[0]):
            raise ValueError("transactional takes one function or keyword arguments only")
        return decorate(tr_args[0])
    return decorate


# -- opening ------------------------------------------------------------------------------------

_databases: dict[str | None, Database] = {}
_databases_lock = threading.Lock()


def _default_cluster_file() -> str:
    return os.environ.get("FDB_CLUSTER_FILE") or "/etc/foundationdb/fdb.cluster"


def _parse_cluster_file(path: str) -> tuple[str, int]:
    """``description:ID@host:port[,host:port...]``: the stand-in takes the first address."""
    try:
        with builtins.open(path) as fh:
            text = fh.read().strip()
        coordinators = text.split("@", 1)[1].split(",")[0]
        host, port = coordinators.rsplit(":", 1)
        return host, int(port.split("(")[0])
    except (OSError, IndexError, ValueError):
        raise FDBError(2104) from None


def open(cluster_file: str | None = None, event_model: Any = None) -> Database:
    with _databases_lock:
        if cluster_file not in _databases:
            _databases[cluster_file] = Database(_parse_cluster_file(cluster_file or _default_cluster_file()))
        return _databases[cluster_file]
