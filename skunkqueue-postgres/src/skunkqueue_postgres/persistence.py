"""The PostgreSQL backend: the Persistence protocol translated to SQL on psycopg 3.

One row per JobRecord in ``<schema>.jobs`` (see :mod:`.schema`), every field a
typed column, so each protocol step is one SQL statement:

* A claim is ``SELECT ... ORDER BY due, id LIMIT n FOR UPDATE SKIP LOCKED``
  on a partial index of the pending rows, feeding an ``UPDATE``: concurrent
  claimers skip each other's rows instead of queueing on them, and only
  pending rows are indexed, so a million finished or running jobs cost a claim
  nothing.
* A finish is one ``UPDATE`` fenced on (id, state, token) that spells
  :meth:`Outcome.apply_to`'s field rules (the kit compares the two), kill
  requests included.
* Idempotency keys are a unique partial index on (queue, key) and
  ``INSERT ... ON CONFLICT DO NOTHING``.
* Flow control (see :mod:`skunkqueue.flow`): the claim's statement takes one
  priority at a time, highest first (a recursive seek of the distinct
  priorities), and claims nothing when a row it picked has a limit key; then,
  and on a route with a pause or a limit, the claim runs in a transaction of
  its own that counts a key's live leases and keeps its rate's time under a
  transaction-scoped advisory lock of the key (tried, never waited for: a key
  another claim is deciding on is skipped this time, so two claims can never
  deadlock), so that concurrent claims never both take a key's last slot.
* Workflows: a finish and the count-down of its dependents are one
  transaction (the finish's statement and the first count pipelined in one
  round trip); see "workflows" below.

The server's clock decides: due times, leases, expiry and stamps compare with
or are set from ``statement_timestamp()`` (the server's time when the
statement began; being stable within a statement it can bound an index scan,
which the volatile ``clock_timestamp()`` cannot). Times a client computed (a
record's ``due``, a retry's back-off) are kept as written while the client's
clock is within ``CLOCK_TOLERANCE`` of the server's, and moved onto the
server's clock beyond that.

Idle workers and result waiters sleep in ``LISTEN``: an enqueue ``NOTIFY``\\ s
its route's channel and a finish its job's channel, in the same statement, so
the wake-up is sent when (and only if) the write commits. Channel names are
hashes of (schema, queue, route or job id): arbitrary names fit PostgreSQL's
63-byte identifiers, and a collision could only cause a spurious wake-up.

Every call on the backend's connection has a deadline (``call_timeout``
seconds, default ``DEFAULT_CALL_TIMEOUT``; see :mod:`.deadline`): past it the
socket is shut down, the connection discarded, and the call raises
``BackendUnavailable`` (one that is safe to repeat first tries once more on a
new connection), as a Redis or MongoDB call does when its socket times out.
A silent server, or a half-open link to it, would otherwise hold the caller
forever: psycopg has no read timeout.

``url`` is a libpq connection string or URI (``postgresql://user:pw@host/db``,
``?sslmode=`` and the other libpq options), passed to libpq unchanged but for
``call_timeout`` (``?call_timeout=30``, or ``call_timeout=30`` in a key=value
string; ``0`` turns the deadline off), which is this backend's; without a
URL, libpq's defaults and ``PG*`` variables apply. ``db`` names the schema
(default ``skunkqueue``), not the database, which the URL names.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import re
import select
import time
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar, Union
from urllib.parse import unquote

import psycopg
from psycopg import errors, pq, sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from skunkqueue import dependencies, flow, policy
from skunkqueue.errors import BackendUnavailable, ConfigurationError, MalformedRecord, PayloadTooLarge
from skunkqueue.metrics import RETENTION, RouteMinute
from skunkqueue.persistence import CLOCK_TOLERANCE, LEASE_KILL, LEASE_LOST, LEASE_OK, Persistence, refuse_names_over
from skunkqueue.record import (
    COMPLETE,
    ERROR,
    HISTORY_LIMIT,
    KILLED,
    KILLED_BY_REQUEST,
    PENDING,
    RUNNING,
    STATES,
    JobRecord,
    Outcome,
    WorkerInfo,
)
from skunkqueue.summary import QueueSummary, RouteSummary
from skunkqueue.urls import redact, scrub
from skunkqueue_postgres import schema as schema_steps
from skunkqueue_postgres.deadline import SocketDeadline

log = logging.getLogger("skunkqueue.postgres")

T = TypeVar("T")

DEFAULT_SCHEMA = "skunkqueue"
# Fail in seconds when the server is down, not after libpq's default (forever). A URL that sets
# either itself wins.
CONNECT_DEFAULTS = {"connect_timeout": "5", "application_name": "skunkqueue"}
# Seconds a call on the connection may go unanswered before its socket is shut down (?call_timeout=).
# Every statement of this backend takes milliseconds; 15 s, like the Redis backend's socket timeout,
# leaves room for a loaded server and lock waits while still ending a hang.
DEFAULT_CALL_TIMEOUT = 15.0
CALL_TIMEOUT = "call_timeout"
# call_timeout=... in a key=value connection string (a value may be quoted, as libpq allows).
_KV_CALL_TIMEOUT = re.compile(r"(?:^|\s)call_timeout\s*=\s*('(?:[^'\\]|\\.)*'|[^\s']*)")
# The server's clock in epoch seconds (microseconds), as of the statement's start.
NOW = "extract(epoch FROM statement_timestamp())::float8"
# How often now()'s estimate of the server's clock is renewed.
CLOCK_SYNC_EVERY = 30.0
# One estimate of the server's clock per process and server, shared by every connection: a pool's
# scheduler reads it to move a slot's due time and the connection it fires through reads it to move
# the time back, so the two cancel. Two estimates differ by their round trips' asymmetry: in CI a
# skewed pool's slot ran 16 ms early by the server's clock.
_CLOCKS: dict[str, tuple[float, float]] = {}  # server -> (server epoch, local monotonic) at one instant
# Names are parts of index entries (a B-tree entry holds at most about 2.7 kB).
MAX_NAME_BYTES = 1024
MAX_KEY_BYTES = 1024
# The class (first key) of the transaction-scoped advisory locks of limit keys and routes ("QF").
FLOW_LOCK = 0x5146
# How soon a claim that found a key locked by another claim may look at that key again (seconds).
BUSY_KEY_PAUSE = 0.05
# Rounds of delete-expired, insert, read-holders before enqueue_keyed gives up (a holder that keeps vanishing).
KEY_ROUNDS = 20

# JobRecord's fields and their column types, in the table's terms.
FIELD_TYPES: dict[str, str] = {
    "id": "text", "queue": "text", "route": "text", "func": "text", "payload": "bytea", "serializer": "text",
    "state": "text", "due": "float8", "created": "float8", "target": "text", "attempts": "int4",
    "retries": "int4", "retry_backoff": "float8", "timeout": "float8", "token": "int8", "owner": "text",
    "lease_until": "float8", "kill_requested": "bool", "started": "float8", "finished": "float8",
    "result": "bytea", "error": "jsonb", "dead": "bool", "key": "text", "result_ttl": "float8",
    "history": "jsonb", "history_dropped": "int4",
    "priority": "int4", "limit_key": "text", "limit_concurrency": "int4", "limit_interval": "float8",
    "limit_burst": "int4",
    "parents": "jsonb", "inputs": "jsonb", "on_failure": "text", "workflow": "text",
}
FIELDS = tuple(FIELD_TYPES)
JSON_FIELDS = frozenset(name for name, kind in FIELD_TYPES.items() if kind == "jsonb")
# Client-computed times that are moved onto the server's clock when the two disagree.
TIME_FIELDS = ("due", "created", "started", "finished", "lease_until")
FINISHED = (COMPLETE, ERROR, KILLED)


class _HolderVanished(Exception):
    """A key was refused, but its holder was gone by the time we looked (it expired or was purged)."""


# What runs the statements: this backend's connection, or a cursor on the application's (enqueue_in).
Executor = Union[psycopg.Connection[dict[str, Any]], psycopg.Cursor[dict[str, Any]]]


def _digest(*parts: str) -> str:
    # "\n" between the parts; surrogates were refused by check_names, NUL cannot be stored.
    return hashlib.md5("\n".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


def _to_record(row: dict[str, Any]) -> JobRecord:
    return JobRecord.from_dict(row)


def take_call_timeout(url: str, where: str) -> tuple[str, float | None]:
    """``url`` without its ``call_timeout`` option, and that option's value in seconds (0: none) if given.

    libpq refuses options it does not know, so this backend's own is taken out before libpq sees it.
    """
    if "://" in url:
        base, sep, query = url.partition("?")
        pairs = [pair for pair in query.split("&") if pair]
        given = [unquote(pair.partition("=")[2]) for pair in pairs if unquote(pair.partition("=")[0]) == CALL_TIMEOUT]
        rest = "&".join(pair for pair in pairs if unquote(pair.partition("=")[0]) != CALL_TIMEOUT)
        url = f"{base}?{rest}" if rest else base
    else:
        given = [m.group(1).strip("'") for m in _KV_CALL_TIMEOUT.finditer(url)]
        url = _KV_CALL_TIMEOUT.sub("", url).strip()
    if not given:
        return url, None
    value = given[-1]
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigurationError(f"call_timeout={value!r} in the PostgreSQL address {where} must be a number of "
                                 f"seconds (0 for no deadline).")
    return url, seconds


def _shift_from(server_now: float) -> float:
    moved = server_now - time.time()
    return moved if abs(moved) > CLOCK_TOLERANCE else 0.0


class PostgresPersistence(Persistence):
    name = "postgres"
    url_schemes = ("postgresql", "postgres")  # an address alone chooses this backend (skunkqueue.config)
    # bytea holds up to 1 GB; a statement's parameters must fit one protocol message too.
    max_payload = 256 * 1024 * 1024
    notifies = True

    def __init__(self, queue: str, *, url: str | None = None, db: str | None = None, **options: Any) -> None:
        super().__init__(queue, url=url, db=db, **options)
        self.address = redact(url) if url else "(libpq's default address)"
        if url and "://" in url and not url.lower().startswith(("postgresql://", "postgres://")):
            raise ConfigurationError(f"The postgres backend takes a postgresql:// URL or a libpq connection "
                                     f"string, not {redact(url)!r}.")
        self.conninfo, call_timeout = take_call_timeout(url or "", self.address)
        self.call_timeout = DEFAULT_CALL_TIMEOUT if call_timeout is None else call_timeout
        try:
            given = conninfo_to_dict(self.conninfo)
        except psycopg.ProgrammingError as exc:
            raise ConfigurationError(f"Bad PostgreSQL address {self.address}: {self._scrub(exc)}") from None
        self._connect_kwargs: dict[str, Any] = {k: v for k, v in CONNECT_DEFAULTS.items() if k not in given}
        self.schema = db or DEFAULT_SCHEMA
        if "\x00" in self.schema or len(self.schema.encode("utf-8", "surrogatepass")) > 63:
            raise ConfigurationError(f"The schema name {self.schema!r} is not a PostgreSQL identifier "
                                     f"(at most 63 bytes, no NUL); pass another with --db.")
        self.s = sql.Identifier(self.schema)
        self.jobs = sql.SQL("{}.jobs").format(self.s)
        self._conn: psycopg.Connection[dict[str, Any]] | None = None
        self._deadline: SocketDeadline | None = None  # the current connection's
        self._listening: set[str] = set()
        self._route_channels: dict[str, str] = {}
        self._statements: dict[str, sql.Composed] = {}
        self._notified = False  # set by _on_notify: a NOTIFY on a channel we listen on arrived
        self._checked_handle: tuple[int, int] | None = None  # enqueue_in's last connection found to be ours
        # Per route: (monotonic time read, paused, limit): the flow settings the claim uses.
        self._flows: dict[str, tuple[float, bool, flow.RouteLimit | None]] = {}
        # Per route whose last claim here left due rows behind for a limit or a pause: when one may be
        # claimable (None: when a finish or a setting notifies, or on a timeout). See wait_for_work.
        self._held_back: dict[str, float | None] = {}
        self._call("connect", lambda conn: None)

    @classmethod
    def check_names(cls, queue: str, routes: Sequence[str] = ()) -> None:
        refuse_names_over(MAX_NAME_BYTES, cls.name, queue, routes)
        for kind, name in (("queue", queue), *(("route", route) for route in routes)):
            if "\x00" in name:
                raise ConfigurationError(f"The {kind} name {name!r} contains a NUL character, which PostgreSQL "
                                         f"text cannot hold; choose another name.")

    # -- plumbing ----------------------------------------------------------------------

    def _scrub(self, exc: BaseException | str) -> str:
        return scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, self.url)

    def _connection(self) -> psycopg.Connection[dict[str, Any]]:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        try:
            conn = psycopg.connect(self.conninfo, autocommit=True, row_factory=dict_row, **self._connect_kwargs)
        except psycopg.OperationalError as exc:
            raise BackendUnavailable(f"Cannot reach PostgreSQL at {self.address}: {self._scrub(exc)}") from None
        except psycopg.ProgrammingError as exc:
            raise ConfigurationError(f"Bad PostgreSQL address {self.address}: {self._scrub(exc)}") from None
        deadline = SocketDeadline(conn.fileno())
        try:
            with self._within(deadline):
                sent = time.monotonic()
                row = conn.execute(f"SELECT {NOW} AS now").fetchone()
                assert row is not None
                clock = self._clock
                if clock is None or time.monotonic() - clock[1] > CLOCK_SYNC_EVERY:  # kept while fresh
                    self._clock = (float(row["now"]), (sent + time.monotonic()) / 2)
                current = schema_steps.version_of(conn, self.schema) == schema_steps.VERSION
            if not current:
                # Not under the deadline: an upgrade may build an index over a large table, and cutting
                # it short would only roll it back for the next opener to start over.
                schema_steps.ensure(conn, self.schema)
        except BaseException as exc:
            conn.close()
            deadline.close()
            if isinstance(exc, psycopg.OperationalError):
                raise BackendUnavailable(f"PostgreSQL at {self.address} is unavailable (connect): "
                                         f"{self._lost_why(exc, deadline)}") from None
            raise
        conn.add_notify_handler(self._on_notify)
        self._conn, self._deadline, self._listening = conn, deadline, set()
        return conn

    def _within(self, deadline: SocketDeadline | None, wait: float = 0.0) -> Any:
        """The deadline of one call on the connection (``wait``: seconds it means to sit idle, on top)."""
        if deadline is None or not self.call_timeout:
            return contextlib.nullcontext(None)
        return deadline.within(self.call_timeout + wait)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        deadline, self._deadline = self._deadline, None
        self._listening = set()
        if deadline is not None:
            deadline.close()
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    def _lost_why(self, exc: BaseException, deadline: SocketDeadline | None) -> str:
        if deadline is not None and deadline.expired:
            return f"no reply within {self.call_timeout:g} s (call_timeout), connection dropped"
        return self._scrub(exc)

    def _call(self, what: str, op: Callable[[psycopg.Connection[dict[str, Any]]], T], *,
              idempotent: bool = True, wait: float = 0.0) -> T:
        """Run ``op`` on the connection, reconnecting once if it broke; PostgreSQL's outages become
        BackendUnavailable. ``op`` runs again after a reconnect only if it is safe to repeat (claim
        and finish are not: their first try may have been applied).

        ``op`` has ``call_timeout`` seconds (plus ``wait``, the time it means to sit idle waiting
        for a notification): past that the connection's socket is shut down, and the call ends as
        one whose connection broke."""
        for attempt in (1, 2):
            conn = self._connection()
            deadline = self._deadline
            try:
                try:
                    with self._within(deadline, wait):
                        result = op(conn)
                except psycopg.Error as exc:
                    if deadline is not None and deadline.expired and not isinstance(exc, psycopg.OperationalError):
                        # Whatever psycopg made of the shut-down socket: a connection lost.
                        raise psycopg.OperationalError(str(exc)) from None
                    raise
                if deadline is not None and deadline.expired:
                    self._drop()  # the reply came just as the deadline passed: the answer stands, the socket not
                return result
            except (errors.SerializationFailure, errors.DeadlockDetected):
                if attempt == 2:
                    raise
                continue  # rolled back whole: nothing was applied, so any step may run again
            except errors.ReadOnlySqlTransaction:
                self._drop()
                raise BackendUnavailable(f"PostgreSQL at {self.address} is read-only (a standby?) ({what})") from None
            except errors.ProgramLimitExceeded as exc:
                raise PayloadTooLarge(f"PostgreSQL refused the {what}: {self._scrub(exc)}") from None
            except psycopg.OperationalError as exc:
                why = self._lost_why(exc, deadline)
                lost = conn.closed or conn.broken or (deadline is not None and deadline.expired)
                if lost:
                    self._drop()
                if lost and idempotent and attempt == 1:
                    log.warning("postgres %s: %s was interrupted (%s); retrying", self.address, what, why)
                    continue
                raise BackendUnavailable(f"PostgreSQL at {self.address} is unavailable ({what}): {why}") from None
            except psycopg.InterfaceError as exc:
                self._drop()
                raise BackendUnavailable(f"Lost the connection to PostgreSQL at {self.address} ({what}): "
                                         f"{self._scrub(exc)}") from None
        raise AssertionError("unreachable")

    def _sql(self, name: str, text: str) -> sql.Composed:
        """A statement of this schema ({jobs}, {workers}, ... name its tables), composed once."""
        found = self._statements.get(name)
        if found is None:
            tables = {t: sql.SQL("{}.{}").format(self.s, sql.Identifier(t))
                      for t in ("jobs", "workers", "settings", "stats", "flow_times", "deps", "settled", "waits")}
            found = self._statements[name] = sql.SQL(text.replace("{now}", NOW)).format(**tables)  # type: ignore[arg-type]
        return found

    @property
    def _clock(self) -> tuple[float, float] | None:
        return _CLOCKS.get(self.conninfo)

    @_clock.setter
    def _clock(self, value: tuple[float, float]) -> None:
        _CLOCKS[self.conninfo] = value

    def now(self) -> float:
        """An estimate of the server's clock, renewed every CLOCK_SYNC_EVERY seconds.

        Only waits and client-side times use it: decisions compare with the server's own clock in SQL.
        """
        clock = self._clock
        if clock is None or time.monotonic() - clock[1] > CLOCK_SYNC_EVERY:
            sent = time.monotonic()
            row = self._call("clock", lambda conn: conn.execute(f"SELECT {NOW} AS now").fetchone())
            assert row is not None
            clock = self._clock = (float(row["now"]), (sent + time.monotonic()) / 2)
        return clock[0] + time.monotonic() - clock[1]

    def _shift(self) -> float:
        return _shift_from(self.now())

    def route_channel(self, route: str) -> str:
        found = self._route_channels.get(route)
        if found is None:
            found = self._route_channels[route] = "skq_r_" + _digest(self.schema, self.queue, route)
        return found

    def worker_channel(self, worker_id: str) -> str:
        """The channel only ``worker_id`` listens on while it waits: its pool wakes it there to stop it."""
        return "skq_w_" + _digest(self.schema, self.queue, worker_id)

    def done_channel(self, job_id: str) -> str:
        return "skq_d_" + _digest(self.schema, self.queue, job_id)

    def durability_warnings(self) -> list[str]:
        warnings = []
        rows = self._call("settings", lambda conn: conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit')").fetchall())
        for row in rows:
            if row["setting"] == "off":
                warnings.append(f"PostgreSQL at {self.address} runs with {row['name']}=off: jobs acknowledged "
                                f"just before a crash may be lost")
        return warnings

    # -- producers -------------------------------------------------------------------

    def _columns(self, records: Sequence[JobRecord], moved: float) -> list[list[Any]]:
        """One list per field (the unnest arrays of an INSERT), times moved onto the server's clock."""
        columns: list[list[Any]] = [[] for _ in FIELDS]
        for record in records:
            data = vars(record)
            for i, name in enumerate(FIELDS):
                value = data[name]
                if name in JSON_FIELDS:
                    value = None if value is None else json.dumps(value)
                elif moved and name in TIME_FIELDS and value is not None:
                    value += moved
                columns[i].append(value)
        return columns

    def _insert_statement(self) -> sql.Composed:
        casts = ", ".join(f"%s::{'text' if t == 'jsonb' else t}[]" for t in FIELD_TYPES.values())
        chosen = ", ".join(f"{name}::jsonb" if name in JSON_FIELDS else name for name in FIELDS)
        return self._sql("insert", f"""
            WITH incoming AS (SELECT * FROM unnest({casts}) AS t({', '.join(FIELDS)})),
            stored AS (
                INSERT INTO {{jobs}} ({', '.join(FIELDS)}, expire_at)
                SELECT {chosen}, CASE WHEN state IN ('complete', 'error', 'killed')
                                      THEN coalesce(finished, {{now}}) + coalesce(result_ttl, %s) END
                FROM incoming
                ON CONFLICT DO NOTHING
                RETURNING id)
            SELECT stored.id, NULL AS notified FROM stored
            UNION ALL SELECT NULL, pg_notify(c, '')::text FROM unnest(%s::text[]) AS c""")

    def enqueue(self, records: Sequence[JobRecord]) -> None:
        self.enqueue_keyed(records)

    def _prepared(self, records: Sequence[JobRecord]) -> tuple[list[Any], list[str]]:
        """The INSERT's parameters for ``records``, and their keys."""
        keys = [r.key for r in records if r.key is not None]
        for key in keys:
            size = len(key.encode("utf-8", "surrogatepass"))
            if size > MAX_KEY_BYTES:
                raise ConfigurationError(f"An idempotency key is {size} bytes long; the postgres backend takes "
                                         f"keys up to {MAX_KEY_BYTES} bytes.")
        channels = sorted({self.route_channel(r.route) for r in records if r.state == PENDING})
        return [*self._columns(records, self._shift()), self.result_ttl, channels], keys

    def enqueue_keyed(self, records: Sequence[JobRecord]) -> list[str]:
        if not records:
            return []
        params, keys = self._prepared(records)

        def store(conn: psycopg.Connection[dict[str, Any]]) -> list[str]:
            if not keys:
                # One statement, all or nothing. A repeat after a lost reply skips the rows the
                # first try stored (ON CONFLICT on the primary key): stored, as asked.
                if not any(r.parents for r in records):
                    conn.execute(self._insert_statement(), params)
                    return [r.id for r in records]
                with conn.transaction():  # a waiting record is stored with its edges, or not at all
                    self._insert_and_attach(conn, records, params)
                return [r.id for r in records]
            for _ in range(KEY_ROUNDS):
                try:
                    with conn.transaction():
                        return self._store_keyed(conn, records, params, keys)
                except _HolderVanished:
                    continue
            raise BackendUnavailable(f"PostgreSQL at {self.address}: the keys of queue {self.queue!r} changed "
                                     f"hands {KEY_ROUNDS} times while enqueueing; try again")

        return self._call("enqueue", store)

    supports_using = True

    def enqueue_in(self, handle: Any, records: Sequence[JobRecord]) -> list[str]:
        """Store the records in the open transaction of ``handle``, the application's psycopg connection.

        Inside a savepoint (a transaction of its own on an autocommit
        connection), so that a failure here leaves the application's
        transaction usable. The NOTIFY goes out when that transaction commits.
        """
        if not isinstance(handle, psycopg.Connection):
            raise ConfigurationError(
                f"using= takes a psycopg (3) Connection for the postgres backend, not {type(handle).__module__}."
                f"{type(handle).__qualname__}; an asyncio one is not supported yet.")
        if not records:
            return []
        params, keys = self._prepared(records)
        self._check_same_database(handle)
        cursor = handle.cursor(row_factory=dict_row)
        if not handle.autocommit and handle.info.transaction_status == pq.TransactionStatus.IDLE:
            # No statement yet in the application's transaction: psycopg's transaction() would make
            # one of its own and commit it at once. A statement begins theirs, and ours is a savepoint in it.
            cursor.execute("SELECT 1")
        try:
            for _ in range(KEY_ROUNDS):
                try:
                    with handle.transaction():
                        if not keys:
                            self._insert_and_attach(cursor, records, params)
                            return [r.id for r in records]
                        return self._store_keyed(cursor, records, params, keys)
                except _HolderVanished:
                    continue
        except errors.InsufficientPrivilege as exc:
            raise ConfigurationError(f"The connection given with using= may not write the queue's tables in schema "
                                     f"{self.schema!r}: {self._scrub(exc)}; grant its user access to them.") from None
        finally:
            cursor.close()
        raise BackendUnavailable(f"PostgreSQL at {self.address}: the keys of queue {self.queue!r} changed "
                                 f"hands {KEY_ROUNDS} times while enqueueing; try again")

    def _check_same_database(self, handle: psycopg.Connection[Any]) -> None:
        """Refuse a connection to another server or database than this queue's (once per connection)."""
        seen = (id(handle), handle.info.backend_pid)
        if self._checked_handle == seen:
            return
        identity = "SELECT current_database() AS db, pg_postmaster_start_time() AS started, " \
                   "inet_server_port() AS port, pg_backend_pid() AS pid"
        with handle.cursor(row_factory=dict_row) as cursor:
            theirs = cursor.execute(identity).fetchone()
        ours = self._call("identify", lambda conn: conn.execute(identity).fetchone())
        assert theirs is not None and ours is not None
        if (theirs["db"], theirs["started"], theirs["port"]) != (ours["db"], ours["started"], ours["port"]):
            raise ConfigurationError(
                f"The connection given with using= reaches database {theirs['db']!r} on another server or "
                f"database than the queue's ({ours['db']!r} at {self.address}); give one to the queue's database.")
        self._checked_handle = seen

    def _store_keyed(self, conn: Executor, records: Sequence[JobRecord], params: list[Any],
                     keys: list[str]) -> list[str]:
        # A holder past its expiry is gone as far as get() goes, so its key is free: delete it first.
        conn.execute(self._sql("free keys", "DELETE FROM {jobs} WHERE queue = %s AND key = ANY(%s) "
                                            "AND expire_at < {now}"), (self.queue, keys))
        stored = self._insert_and_attach(conn, records, params)
        refused = [r for r in records if r.id not in stored]
        if not refused:
            return [r.id for r in records]
        # A repeat of an interrupted enqueue finds the rows its first try stored.
        own = conn.execute(self._sql("own", "SELECT id FROM {jobs} WHERE queue = %s AND id = ANY(%s)"),
                           (self.queue, [r.id for r in refused])).fetchall()
        stored |= {row["id"] for row in own}
        held = conn.execute(self._sql("holders", "SELECT key, id FROM {jobs} WHERE queue = %s AND key = ANY(%s)"),
                            (self.queue, [r.key for r in refused if r.key is not None])).fetchall()
        holders = {row["key"]: row["id"] for row in held}
        answer = []
        for record in records:
            if record.id in stored:
                answer.append(record.id)
            elif record.key in holders:
                answer.append(holders[record.key])
            else:
                raise _HolderVanished()  # deleted after the insert looked: roll back and try again
        return answer

    def _insert_and_attach(self, conn: Executor, records: Sequence[JobRecord], params: list[Any]) -> set[str]:
        """Insert the records (inside a transaction where any waits); return the ids this insert stored.

        Only those are attached: a row a repeated enqueue found stored was attached by the
        transaction that stored it, and a record whose key was held is not stored at all.
        """
        rows = conn.execute(self._insert_statement(), params).fetchall()
        stored = {row["id"] for row in rows if row["id"] is not None}
        self._attach(conn, [r for r in records if r.parents and r.id in stored])
        return stored

    def get(self, job_id: str) -> JobRecord | None:
        row = self._call("get", lambda conn: conn.execute(self._sql("get", f"""
            SELECT {', '.join(FIELDS)} FROM {{jobs}} WHERE queue = %s AND id = %s
            AND (expire_at IS NULL OR expire_at >= {{now}})"""), (self.queue, job_id)).fetchone())
        return None if row is None else _to_record(row)

    def _where(self, route: str | None, state: str | None, dead: bool | None) -> tuple[sql.Composable, list[Any]]:
        clauses: list[sql.Composable] = [sql.SQL("queue = %s"), sql.SQL(f"(expire_at IS NULL OR expire_at >= {NOW})")]
        args: list[Any] = [self.queue]
        for column, value in (("route", route), ("state", state), ("dead", dead)):
            if value is not None:
                clauses.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
                args.append(value)
        return sql.SQL(" AND ").join(clauses), args

    def _records(self, rows: Iterable[dict[str, Any]]) -> list[JobRecord]:
        found = []
        for row in rows:
            try:
                found.append(_to_record(row))
            except MalformedRecord:
                continue
        return found

    def list_jobs(self, *, route: str | None = None, state: str | None = None,
                  dead: bool | None = None, limit: int = 1000) -> list[JobRecord]:
        where, args = self._where(route, state, dead)
        query = sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY due, id LIMIT %s").format(
            sql.SQL(", ".join(FIELDS)), self.jobs, where)
        return self._records(self._call("list jobs", lambda conn: conn.execute(query, (*args, limit)).fetchall()))

    # Rows of the primary key one list_page call looks at, at most (the monitor's scan budget).
    PAGE_SCAN = 1000

    pages_newest_first = True

    def list_page(self, *, route: str | None = None, state: str | None = None, dead: bool | None = None,
                  limit: int = 100, after: str | None = None,
                  newest: bool = False) -> tuple[list[JobRecord], str | None]:
        # Keyset paging in id order (ids never change, so a page boundary holds while records move):
        # a call looks at most PAGE_SCAN rows of the primary key past the cursor, however deep the page
        # and however rarely the filters match, and may come back short with a cursor. The cursor is
        # "id:<the last id looked at>" ("nd:" newest first: the primary key read backwards).
        mark = "nd:" if newest else "id:"
        if after is not None and not after.startswith(mark):
            raise ValueError(f"{after!r} is not a page cursor of this store")
        scan = max(limit, self.PAGE_SCAN)
        past, order = ("id < %s", "DESC") if newest else ("id > %s", "")
        if newest and after is None:
            past = "true"

        def look(conn: psycopg.Connection[dict[str, Any]]) -> list[dict[str, Any]]:
            with conn.transaction():
                # Right after a bulk insert the planner's statistics are stale, and it then prefers a
                # bitmap scan of another (queue, ...) index and a sort of the whole queue (50 ms at
                # 20,000 jobs, growing with the queue) to the primary key's order.
                conn.execute("SET LOCAL enable_sort = off; SET LOCAL enable_bitmapscan = off")
                return conn.execute(self._sql(f"page window {past} {order}", f"""
                    SELECT id, route, state, dead, (expire_at IS NULL OR expire_at >= {{now}}) AS live FROM {{jobs}}
                    WHERE queue = %s AND {past} ORDER BY queue {order}, id {order} LIMIT %s"""),
                    (self.queue, *([] if past == "true" else [after[3:] if after else ""]), scan)).fetchall()

        window = self._call("list page", look)
        chosen: list[str] = []
        cursor = f"{mark}{window[-1]['id']}" if len(window) == scan else None
        for n, row in enumerate(window, 1):
            if not row["live"] or (route is not None and row["route"] != route) or \
                    (state is not None and row["state"] != state) or (dead is not None and row["dead"] != dead):
                continue
            chosen.append(row["id"])
            if len(chosen) == limit:
                cursor = f"{mark}{row['id']}" if n < len(window) or len(window) == scan else None
                break
        if not chosen:
            return [], cursor
        rows = self._call("list page", lambda conn: conn.execute(self._sql(f"page rows {order}", f"""
            SELECT {', '.join(FIELDS)} FROM {{jobs}} WHERE queue = %s AND id = ANY(%s) ORDER BY id {order}"""),
            (self.queue, chosen)).fetchall())
        return self._records(rows), cursor

    def counts(self) -> dict[tuple[str, str], int]:
        rows = self._call("counts", lambda conn: conn.execute(self._sql("counts", """
            SELECT route, state, count(*) AS n FROM {jobs}
            WHERE queue = %s AND (expire_at IS NULL OR expire_at >= {now}) GROUP BY route, state"""),
            (self.queue,)).fetchall())
        return {(row["route"], row["state"]): int(row["n"]) for row in rows}

    def summary(self, now: float | None = None) -> QueueSummary:
        # One GROUP BY (dead letters counted in it), then one index seek per route for the longest wait.
        def read(conn: psycopg.Connection[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            groups = conn.execute(self._sql("summary", """
                SELECT route, state, count(*) AS n, count(*) FILTER (WHERE dead AND state = 'error') AS dead,
                       {now} AS server_now
                FROM {jobs} WHERE queue = %s AND (expire_at IS NULL OR expire_at >= {now})
                GROUP BY route, state"""), (self.queue,)).fetchall()
            routes = sorted({row["route"] for row in groups if row["state"] == PENDING})
            oldest = conn.execute(self._sql("oldest", """
                SELECT r AS route, (SELECT due FROM {jobs} WHERE queue = %s AND route = r AND state = 'pending'
                                    ORDER BY due, id LIMIT 1) AS due
                FROM unnest(%s::text[]) AS r"""), (self.queue, routes)).fetchall() if routes else []
            return groups, oldest

        groups, oldest = self._call("summary", read)
        if now is None:
            now = float(groups[0]["server_now"]) if groups else self.now()
        found: dict[str, tuple[dict[str, int], int]] = {}
        for row in groups:
            states, dead = found.get(row["route"], (dict.fromkeys(STATES, 0), 0))
            if row["state"] in states:
                states[row["state"]] = int(row["n"])
            found[row["route"]] = (states, dead + int(row["dead"]))
        first = {row["route"]: row["due"] for row in oldest}
        summaries = []
        for route, (states, dead) in sorted(found.items()):
            due = first.get(route)
            summaries.append(RouteSummary(route, states, dead, due if due is not None and due <= now else None))
        return QueueSummary(summaries)

    def purge(self, route: str, *, target: str | None = None) -> int:
        # A purged waiting record's workflow rows go with it (a parent finishing later counts nothing).
        def purge(conn: psycopg.Connection[dict[str, Any]]) -> int:
            row = conn.execute(self._sql("purge", """
                WITH gone AS (
                    DELETE FROM {jobs} WHERE queue = %(queue)s AND route = %(route)s AND state = 'pending'
                      AND (%(target)s::text IS NULL OR target = %(target)s::text)
                    RETURNING id),
                waiting AS (DELETE FROM {waits} WHERE queue = %(queue)s AND child IN (SELECT id FROM gone)),
                sets AS (DELETE FROM {settled} WHERE queue = %(queue)s AND child IN (SELECT id FROM gone))
                SELECT count(*) AS n FROM gone"""), {"queue": self.queue, "route": route, "target": target}).fetchone()
            return 0 if row is None else int(row["n"])

        return self._call("purge", purge)

    def request_kill(self, job_id: str) -> bool:
        return self._call("kill", lambda conn: conn.execute(self._sql("kill", """
            UPDATE {jobs} SET kill_requested = true WHERE queue = %s AND id = %s AND state = 'running'"""),
            (self.queue, job_id)).rowcount == 1)

    def delete_finished(self, job_ids: Sequence[str]) -> int:
        if not job_ids:
            return 0
        return self._call("delete finished", lambda conn: conn.execute(self._sql("delete finished", """
            DELETE FROM {jobs} WHERE queue = %s AND id = ANY(%s) AND state IN ('complete', 'error', 'killed')"""),
            (self.queue, list(job_ids))).rowcount)

    # -- workers ---------------------------------------------------------------------

    supports_priorities = True
    supports_limits = True
    supports_pause = True

    def _claim_statement(self) -> sql.Composed:
        # Levels: the route's distinct pending priorities, highest first, one index seek each; each
        # is walked in (due, id) order only as far as the claim needs. A picked row with a limit key
        # makes the statement claim nothing and return one row of NULLs with flow_blocked set: the
        # claim then decides in _claim_flow. (The recursive CTE yields its rows in the order it
        # makes them and the nested loop reads them lazily; the result is sorted again anyway.)
        nulls = ", ".join(f"NULL::{kind}" for kind in FIELD_TYPES.values())
        return self._sql("claim", f"""
            WITH RECURSIVE levels(p) AS (
                SELECT max(priority) FROM {{jobs}} WHERE queue = %(queue)s AND route = %(route)s AND state = 'pending'
              UNION ALL
                SELECT (SELECT max(priority) FROM {{jobs}} WHERE queue = %(queue)s AND route = %(route)s
                        AND state = 'pending' AND priority < levels.p)
                FROM levels WHERE levels.p IS NOT NULL),
            picked AS (
                SELECT c.queue, c.id, c.limit_key FROM levels CROSS JOIN LATERAL (
                    SELECT queue, id, limit_key FROM {{jobs}}
                    WHERE queue = %(queue)s AND route = %(route)s AND state = 'pending' AND priority = levels.p
                      AND due <= {{now}} AND (target IS NULL OR target = %(worker)s)
                    ORDER BY due, id LIMIT %(limit)s
                    FOR UPDATE SKIP LOCKED) AS c
                LIMIT %(limit)s),
            limited AS (SELECT EXISTS (SELECT 1 FROM picked WHERE limit_key IS NOT NULL) AS yes),
            taken AS (
                UPDATE {{jobs}} AS j SET state = 'running', owner = %(worker)s, lease_until = {{now}} + %(lease)s,
                    token = j.token + 1, attempts = j.attempts + 1, started = {{now}}, kill_requested = false
                FROM picked WHERE j.queue = picked.queue AND j.id = picked.id AND NOT (SELECT yes FROM limited)
                RETURNING {', '.join('j.' + f for f in FIELDS)})
            SELECT *, false AS flow_blocked FROM taken
            UNION ALL SELECT {nulls}, true WHERE (SELECT yes FROM limited)""")

    def _claim(self, conn: psycopg.Connection[dict[str, Any]], route: str, worker_id: str, lease: float,
               limit: int) -> list[JobRecord]:
        paused, route_limit = self._route_flow(conn, route)
        if paused or route_limit is not None:
            return self._claim_flow(conn, route, worker_id, lease, limit, paused, route_limit)
        rows = conn.execute(self._claim_statement(), {"queue": self.queue, "route": route, "worker": worker_id,
                                                      "lease": float(lease), "limit": limit}).fetchall()
        if any(row["flow_blocked"] for row in rows):
            return self._claim_flow(conn, route, worker_id, lease, limit, paused, route_limit)
        self._held_back.pop(route, None)
        return self._taken(conn, rows)

    def _taken(self, conn: psycopg.Connection[dict[str, Any]], rows: list[dict[str, Any]]) -> list[JobRecord]:
        claimed = []
        for row in rows:
            row.pop("flow_blocked", None)
            try:
                claimed.append(_to_record(row))
            except MalformedRecord as exc:
                self._quarantine(conn, row["id"], str(exc))
        claimed.sort(key=lambda r: (-r.priority, r.due, r.id))
        return claimed

    def _route_flow(self, conn: psycopg.Connection[dict[str, Any]], route: str) -> tuple[bool, flow.RouteLimit | None]:
        """The route's paused flag and limit, read at most SETTINGS_TTL seconds ago."""
        now = time.monotonic()
        found = self._flows.get(route)
        if found is None or now - found[0] > flow.SETTINGS_TTL:
            names = [flow.pause_setting(route), flow.limit_setting(route)]
            values = {row["name"]: row["value"] for row in conn.execute(self._sql("flow settings", """
                SELECT name, value FROM {settings} WHERE queue = %s AND name = ANY(%s)"""),
                (self.queue, names)).fetchall()}
            found = self._flows[route] = (now, names[0] in values, flow.RouteLimit.from_json(values.get(names[1])))
        return found[1], found[2]

    def _flow_lock(self, conn: psycopg.Connection[dict[str, Any]], kind: str, name: str, *, wait: bool) -> bool:
        """A transaction-scoped advisory lock of a key ("k") or a route ("r") of this queue."""
        function = "pg_advisory_xact_lock" if wait else "pg_try_advisory_xact_lock"
        row = conn.execute(f"SELECT {function}(%s, hashtext(%s))::text AS ok",
                           (FLOW_LOCK, "\n".join((self.schema, self.queue, kind, name)))).fetchone()
        return wait or (row is not None and row["ok"] == "true")

    def _claim_flow(self, conn: psycopg.Connection[dict[str, Any]], route: str, worker_id: str, lease: float,
                    limit: int, paused: bool, route_limit: flow.RouteLimit | None) -> list[JobRecord]:
        """The claim of a route with a pause or a limit, or with limited jobs due: the rules of the
        Persistence docstring, in one transaction."""
        if paused:
            self._held_back[route] = None
            return []
        with conn.transaction():
            row = conn.execute(f"SELECT {NOW} AS now").fetchone()
            assert row is not None
            now = float(row["now"])
            room = limit
            if route_limit is not None:
                self._flow_lock(conn, "r", route, wait=True)  # the one lock waited for: no deadlock
                if route_limit.concurrency is not None:
                    found = conn.execute(self._sql("route slots", """
                        SELECT count(*) AS n, min(lease_until) AS first FROM {jobs}
                        WHERE queue = %s AND route = %s AND state = 'running' AND lease_until > %s"""),
                        (self.queue, route, now)).fetchone()
                    assert found is not None
                    room = min(room, route_limit.concurrency - int(found["n"]))
                    if room <= 0:
                        self._held_back[route] = found["first"]
                        return []
            taken: list[str] = []
            slots: dict[str, int] = {}            # live leases per key, this claim's included
            admission = flow.Admission(now, route, route_limit, lambda name: self._stored_time(conn, name))
            looked = 0
            for row in self._flow_candidates(conn, route, worker_id, now, limit + 8):
                looked += 1
                if looked > flow.FLOW_SCAN:
                    admission.hold(None)
                    break
                key = row["limit_key"]
                interval = row["limit_interval"]
                decision = admission.admit(
                    key, row["limit_concurrency"], None if interval is None else float(interval),
                    None if row["limit_burst"] is None else int(row["limit_burst"]),
                    lambda key, cap: self._key_blocked(conn, key, cap, now, slots))
                if decision == flow.STOP:
                    break
                if decision == flow.SKIP:
                    continue
                if key is not None:
                    slots[key] = slots.get(key, 0) + 1
                taken.append(row["id"])
                if len(taken) >= room:
                    break
            # The claim's now is its transaction's start: a later claim may have started earlier.
            written = admission.to_write(now)
            if written:
                conn.execute(self._sql("rate times", """
                    INSERT INTO {flow_times} (queue, name, tat) SELECT %s, n, t FROM unnest(%s::text[], %s::float8[])
                        AS x(n, t)
                    ON CONFLICT (queue, name) DO UPDATE SET tat = excluded.tat"""),
                    (self.queue, [n for n, _ in written], [t for _, t in written]))
            rows = conn.execute(self._sql("claim taken", f"""
                UPDATE {{jobs}} SET state = 'running', owner = %s, lease_until = %s + %s, token = token + 1,
                    attempts = attempts + 1, started = %s, kill_requested = false
                WHERE queue = %s AND id = ANY(%s) AND state = 'pending'
                RETURNING {', '.join(FIELDS)}"""),
                (worker_id, now, float(lease), now, self.queue, taken)).fetchall() if taken else []
        if admission.held_back and len(taken) < limit:
            self._held_back[route] = admission.wake
        else:
            self._held_back.pop(route, None)
        return self._taken(conn, rows)

    def _flow_candidates(self, conn: psycopg.Connection[dict[str, Any]], route: str, worker_id: str, now: float,
                         page: int) -> Iterator[dict[str, Any]]:
        """Due pending rows of the route, locked (SKIP LOCKED), by priority, then due, then id."""
        level_sql = self._sql("next level", """
            SELECT max(priority) AS p FROM {jobs} WHERE queue = %s AND route = %s AND state = 'pending'
                AND priority < %s""")
        page_sql = self._sql("flow page", """
            SELECT id, due, limit_key, limit_concurrency, limit_interval, limit_burst FROM {jobs}
            WHERE queue = %s AND route = %s AND state = 'pending' AND priority = %s AND due <= %s
              AND (target IS NULL OR target = %s) AND (due, id) > (%s, %s)
            ORDER BY due, id LIMIT %s FOR UPDATE SKIP LOCKED""")
        found = conn.execute(level_sql, (self.queue, route, flow.MAX_PRIORITY + 1)).fetchone()
        level = None if found is None else found["p"]
        while level is not None:
            after: tuple[float, str] = (float("-inf"), "")
            while True:
                rows = conn.execute(page_sql, (self.queue, route, level, now, worker_id, *after, page)).fetchall()
                yield from rows
                if len(rows) < page:
                    break
                after = (rows[-1]["due"], rows[-1]["id"])
            found = conn.execute(level_sql, (self.queue, route, level)).fetchone()
            level = None if found is None else found["p"]

    def _key_blocked(self, conn: psycopg.Connection[dict[str, Any]], key: str, cap: int | None, now: float,
                     slots: dict[str, int]) -> float | None:
        """None if the key has a free slot (and this claim holds the key's lock); else when to look again."""
        if key not in slots:
            if not self._flow_lock(conn, "k", key, wait=False):
                return now + BUSY_KEY_PAUSE  # another claim is deciding on this key right now
            found = conn.execute(self._sql("key slots", """
                SELECT count(*) AS n FROM {jobs}
                WHERE queue = %s AND limit_key = %s AND state = 'running' AND lease_until > %s"""),
                (self.queue, key, now)).fetchone()
            slots[key] = 0 if found is None else int(found["n"])
        if cap is None or slots[key] < cap:
            return None
        first = conn.execute(self._sql("key first end", """
            SELECT min(lease_until) AS first FROM {jobs}
            WHERE queue = %s AND limit_key = %s AND state = 'running' AND lease_until > %s"""),
            (self.queue, key, now)).fetchone()
        return float(first["first"]) if first is not None and first["first"] is not None else 0.0

    def _stored_time(self, conn: psycopg.Connection[dict[str, Any]], name: str) -> float | None:
        row = conn.execute(self._sql("rate time", "SELECT tat FROM {flow_times} WHERE queue = %s AND name = %s"),
                           (self.queue, name)).fetchone()
        return None if row is None else float(row["tat"])

    def rate_times(self, names: Sequence[str]) -> dict[str, float]:
        rows = self._call("rate times", lambda conn: conn.execute(self._sql("read rate times", """
            SELECT name, tat FROM {flow_times} WHERE queue = %s AND name = ANY(%s) AND tat > {now}"""),
            (self.queue, list(names))).fetchall())
        return {row["name"]: float(row["tat"]) for row in rows}

    def _limits_route(self, route: str) -> bool:
        """True when this instance last saw a pause or a concurrency limit on the route."""
        found = self._flows.get(route)
        return found is not None and (found[1] or (found[2] is not None and found[2].concurrency is not None))

    def claim(self, route: str, worker_id: str, lease: float, limit: int = 1) -> list[JobRecord]:
        return self._call("claim", lambda conn: self._claim(conn, route, worker_id, lease, limit), idempotent=False)

    def _quarantine(self, conn: psycopg.Connection[dict[str, Any]], job_id: str, why: str) -> None:
        # Keep the damaged row for inspection but take it out of every route.
        error = policy.quarantined(why).error
        conn.execute(self._sql("quarantine", """
            UPDATE {jobs} SET state = 'error', dead = true, error = %s::jsonb, owner = NULL, lease_until = NULL,
                finished = {now}, expire_at = {now} + %s WHERE queue = %s AND id = %s"""),
            (json.dumps(error), self.result_ttl, self.queue, job_id))
        log.warning("postgres: quarantined record %r of queue %s: %s", job_id, self.queue, why)

    def renew(self, worker_id: str, leases: Sequence[tuple[str, int]], lease: float) -> dict[str, str]:
        if not leases:
            return {}
        rows = self._call("renew", lambda conn: conn.execute(self._sql("renew", """
            UPDATE {jobs} SET lease_until = {now} + %s
            WHERE queue = %s AND owner = %s AND state = 'running'
              AND (id, token) IN (SELECT * FROM unnest(%s::text[], %s::int8[]))
            RETURNING id, kill_requested"""), (float(lease), self.queue, worker_id, [j for j, _ in leases],
                                               [t for _, t in leases])).fetchall())
        kept = {row["id"]: row["kill_requested"] for row in rows}
        return {job_id: (LEASE_LOST if job_id not in kept else LEASE_KILL if kept[job_id] else LEASE_OK)
                for job_id, _ in leases}

    def _finish_statement(self, pending: bool, attempt: bool) -> sql.Composed:
        # Outcome.apply_to in SQL (the kit compares the two). Every right-hand side reads the row as
        # it was, so "kill_requested" below is the flag before this update clears it.
        # With ``attempt``: the ended attempt's entry, stamped with the server's clock, goes on the end of
        # the history, of which the last %(keep)s entries stay; the rest are counted in history_dropped.
        history = """, history = (
                SELECT coalesce(jsonb_agg(e ORDER BY n), '[]'::jsonb)
                FROM jsonb_array_elements(history || jsonb_build_array(
                    %(attempt)s::jsonb || jsonb_build_object('finished', {now}))) WITH ORDINALITY AS t(e, n)
                WHERE n > jsonb_array_length(history) + 1 - %(keep)s),
            history_dropped = history_dropped + greatest(0, jsonb_array_length(history) + 1 - %(keep)s)""" \
            if attempt else ""
        if not pending:
            sets = """state = %(state)s, result = %(result)s, error = %(error)s::jsonb,
                finished = coalesce(%(finished)s, {now}),
                expire_at = coalesce(%(finished)s, {now}) + coalesce(result_ttl, %(ttl)s),
                dead = %(dead)s"""
        else:
            sets = """state = CASE WHEN kill_requested THEN 'killed' ELSE 'pending' END,
                result = NULL,
                error = CASE WHEN kill_requested THEN %(killed)s::jsonb ELSE %(error)s::jsonb END,
                due = CASE WHEN kill_requested THEN due ELSE coalesce(%(due)s, {now}) END,
                finished = CASE WHEN kill_requested THEN {now} END,
                expire_at = CASE WHEN kill_requested THEN {now} + coalesce(result_ttl, %(ttl)s) END,
                dead = CASE WHEN kill_requested THEN false ELSE %(dead)s END"""
        return self._sql(f"finish {pending} {attempt}", f"""
            WITH done AS (
                UPDATE {{jobs}} SET {sets}{history}, owner = NULL, lease_until = NULL, kill_requested = false,
                    attempts = coalesce(%(attempts)s, attempts)
                WHERE queue = %(queue)s AND id = %(id)s AND state = %(expect)s AND token = %(token)s
                RETURNING state, route, limit_key, (parents IS NOT NULL AND due >= %(waiting)s) AS waited)
            SELECT state, route, limit_key, waited,
                CASE WHEN state <> 'pending' THEN pg_notify(%(channel)s, '')::text END AS notified
            FROM done""")

    def _finish(self, conn: psycopg.Connection[dict[str, Any]], job_id: str, token: int, outcome: Outcome,
                expect: str) -> bool:
        moved = self._shift()
        pending = outcome.state == PENDING
        params = {
            "state": outcome.state, "result": outcome.result,
            "error": None if outcome.error is None else json.dumps(outcome.error),
            "killed": json.dumps(KILLED_BY_REQUEST), "dead": outcome.dead, "attempts": outcome.attempts,
            "due": None if outcome.due is None else outcome.due + (0.0 if outcome.due_from_store else moved),
            "finished": None if outcome.finished is None else outcome.finished + moved,
            "ttl": self.result_ttl, "queue": self.queue, "id": job_id, "expect": expect, "token": token,
            "channel": self.done_channel(job_id), "waiting": dependencies.WAITING_DUE,
            "attempt": None if outcome.attempt is None else json.dumps(outcome.attempt), "keep": HISTORY_LIMIT,
        }
        # The finish and its count-down commit together: one transaction, and one round trip for
        # the finish and the first count (pipelined; the count reads the parent's state as this
        # transaction left it, so it counts nothing when the finish was fenced off or is a retry).
        with conn.pipeline(), conn.transaction():
            done = conn.execute(self._finish_statement(pending, outcome.attempt is not None), params)
            counted = conn.execute(self._count_statement(), {"queue": self.queue, "parents": [job_id],
                                                             "children": None})
            row = done.fetchone()
            # Acted on even after a fenced-off finish: whatever a count decremented is released here.
            self._settle(conn, counted.fetchall())
            if row is None:
                return False
            frees_slot = expect == RUNNING and (row["limit_key"] is not None or self._limits_route(row["route"]))
            if row["state"] == PENDING or frees_slot:  # a retry, a hand-back, or a slot freed: wake the route
                conn.execute("SELECT pg_notify(%s, '')", (self.route_channel(row["route"]),))
            if row["state"] != PENDING and row["waited"]:  # a waiting record killed by request: it waits no more
                conn.execute(self._sql("unwait", "DELETE FROM {waits} WHERE queue = %s AND child = %s"),
                             (self.queue, job_id))
        return True

    def finish(self, job_id: str, token: int, outcome: Outcome, *, expect: str = RUNNING) -> bool:
        return self._call("finish", lambda conn: self._finish(conn, job_id, token, outcome, expect),
                          idempotent=False)

    def finish_and_claim(self, job_id: str, token: int, outcome: Outcome, route: str, worker_id: str,
                         lease: float, limit: int = 1) -> tuple[bool, list[JobRecord]]:
        # One transaction: the finish and the next claim commit together, so a worker pays one WAL flush
        # per job instead of two (with fsync on, the flush is most of a job's time). A failure rolls back
        # both, and a deadlock or serialization failure retried by _call repeats both from the start. A
        # claim flow control decides sees the slot its own finish frees; other workers' claims see it
        # once this one commits (they wait for the route's lock, which it holds until then).
        def both(conn: psycopg.Connection[dict[str, Any]]) -> tuple[bool, list[JobRecord]]:
            with conn.transaction():
                return (self._finish(conn, job_id, token, outcome, RUNNING),
                        self._claim(conn, route, worker_id, lease, limit))

        return self._call("finish and claim", both, idempotent=False)

    # -- workflows (see the Persistence docstring) ---------------------------------------
    #
    # As SQLite does it, in PostgreSQL: deps (parent, child) says who waits for whom; settled
    # (child, parent) is the SET of a waiting record's finished parents, whose primary key makes
    # a repeated count insert nothing; waits (child) holds how many parents are still to come,
    # decremented once per row that went into the set, and exists while the record waits.
    # A count-down runs in the transaction of the parent's finish. A dependent attached while
    # its parent finishes cannot be missed by both: the attach locks the parent rows FOR SHARE
    # before reading their states, so a finish either committed first (the attach reads it
    # finished and counts it) or waits for the attach to commit and then reads its deps rows
    # (each statement reads the data committed before it began).

    supports_workflows = True

    # What a count statement returns: a row per dependent it counted parents into, with the parents
    # and their states, and what the dependent waits for after all of them (a dependent of two
    # parents finished together is decremented by two, once: an UPDATE ... FROM that joined it to
    # two rows would change it once, and which row won would be PostgreSQL's choice).
    _DECREMENT = """
            per_child AS (
                SELECT child, count(*) AS n, array_agg(parent) AS parents, array_agg(state) AS states
                FROM counted GROUP BY child)
            UPDATE {waits} w SET remaining = w.remaining - per_child.n FROM per_child
            WHERE w.queue = %(queue)s AND w.child = per_child.child
            RETURNING w.child, w.remaining, w.run_anyway, per_child.parents, per_child.states"""

    def _count_statement(self) -> sql.Composed:
        # Counts each parent of %(parents)s into the set of each of its dependents (or of those in
        # %(children)s) if it is finished as this transaction sees it, and decrements what each
        # newly counted one waits for. A parent not (or not yet) finished, or counted before,
        # counts nothing. One statement for any number of parents: a fan-out's dependents ended
        # together are counted for together, not in a round trip each.
        return self._sql("count down", """
            WITH parent AS (
                SELECT id, state FROM {jobs}
                WHERE queue = %(queue)s AND id = ANY(%(parents)s::text[]) AND state IN ('complete', 'error', 'killed')),
            counted AS (
                INSERT INTO {settled} (queue, child, parent, state)
                SELECT %(queue)s, d.child, parent.id, parent.state FROM {deps} d, parent
                WHERE d.queue = %(queue)s AND d.parent = parent.id
                  AND (%(children)s::text[] IS NULL OR d.child = ANY(%(children)s::text[]))
                ON CONFLICT DO NOTHING
                RETURNING child, parent, state),""" + self._DECREMENT)

    def _count(self, conn: Executor, parents: list[str], children: list[str] | None = None) -> list[dict[str, Any]]:
        return conn.execute(self._count_statement(), {"queue": self.queue, "parents": parents,
                                                      "children": children}).fetchall()

    def _count_missing(self, conn: Executor, parent: str, children: list[str]) -> list[dict[str, Any]]:
        """Count a parent that has no row (expired, purged, never stored) as it cannot be shown to
        have completed (``dependencies.missing_parent_state``)."""
        return conn.execute(self._sql("count missing", """
            WITH counted AS (
                INSERT INTO {settled} (queue, child, parent, state)
                SELECT %(queue)s, c, %(parent)s, %(state)s FROM unnest(%(children)s::text[]) AS c
                ON CONFLICT DO NOTHING
                RETURNING child, parent, state),""" + self._DECREMENT),
            {"queue": self.queue, "parent": parent, "children": children,
             "state": dependencies.missing_parent_state()}).fetchall()

    def _attach(self, conn: Executor, records: Sequence[JobRecord]) -> None:
        """Make stored waiting records dependents of their parents; count the parents already finished.

        Runs in the transaction that stored them. Batched: a group of 10,000 members attaches
        in three statements, not 30,000.
        """
        if not records:
            return
        edges = [(parent, r.id) for r in records for parent in dependencies.unique(r.parents or ())]
        conn.execute(self._sql("wait", """
            INSERT INTO {waits} (queue, child, remaining, run_anyway)
            SELECT %s, c, n, a FROM unnest(%s::text[], %s::int4[], %s::bool[]) AS t(c, n, a)
            ON CONFLICT DO NOTHING"""),
            (self.queue, [r.id for r in records], [len(dependencies.unique(r.parents or ())) for r in records],
             [dependencies.runs_anyway(r) for r in records]))
        conn.execute(self._sql("depend", """
            INSERT INTO {deps} (queue, parent, child) SELECT %s, p, c FROM unnest(%s::text[], %s::text[]) AS t(p, c)
            ON CONFLICT DO NOTHING"""), (self.queue, [p for p, _ in edges], [c for _, c in edges]))
        # In id order, as every attach locks them: two attaches never wait for each other in a circle.
        parents = sorted({p for p, _ in edges})
        rows = conn.execute(self._sql("lock parents", """
            SELECT id, state, (expire_at IS NULL OR expire_at >= {now}) AS live FROM {jobs}
            WHERE queue = %s AND id = ANY(%s) ORDER BY id FOR SHARE"""), (self.queue, parents)).fetchall()
        found = {row["id"]: row["state"] for row in rows if row["live"]}
        children: dict[str, list[str]] = {}
        for parent, child in edges:
            children.setdefault(parent, []).append(child)
        for parent in parents:
            state = found.get(parent)
            if state is None:
                self._settle(conn, self._count_missing(conn, parent, children[parent]))
            elif state in FINISHED:
                self._settle(conn, self._count(conn, [parent], children[parent]))

    def _settle(self, conn: Executor, counts: list[dict[str, Any]]) -> None:
        """Release or end the dependents a count statement counted parents for (what it returned).

        A dependent is ended if any parent counted for it ends it (the one of lowest id names itself
        in its error), released if none does and it waits for nothing more. Those ended are counted for
        in turn, all of one round together: a worklist, not recursion, since a chain may be long.
        """
        while counts:
            ending: dict[str, tuple[str, str]] = {}  # dependent -> (a parent ending it, its state)
            for c in counts:
                ends = [(p, state) for p, state in zip(c["parents"], c["states"])
                        if dependencies.kills_dependent(state, bool(c["run_anyway"]))]
                if ends:
                    ending[c["child"]] = min(ends)
            ready = sorted({c["child"] for c in counts if c["remaining"] <= 0} - ending.keys())
            if ready:
                routes = conn.execute(self._sql("release", """
                    WITH gone AS (DELETE FROM {waits} WHERE queue = %(queue)s AND child = ANY(%(ids)s) RETURNING child)
                    UPDATE {jobs} j SET due = {now} FROM gone
                    WHERE j.queue = %(queue)s AND j.id = gone.child AND j.state = 'pending' AND j.due >= %(waiting)s
                    RETURNING j.route"""),
                    {"queue": self.queue, "ids": ready, "waiting": dependencies.WAITING_DUE}).fetchall()
                channels = sorted({self.route_channel(row["route"]) for row in routes})
                if channels:  # sent when (and only if) the release commits
                    conn.execute("SELECT pg_notify(c, '') FROM unnest(%s::text[]) AS c", (channels,))
            ended: list[str] = []
            if ending:
                children = sorted(ending)
                # Each distinct error is sent once (a fan-out's thousands of dependents share one):
                # a dependent names its error by its place in %(errors)s.
                distinct: dict[tuple[str, str], int] = {}
                which = [distinct.setdefault(ending[child], len(distinct)) + 1 for child in children]
                errors = [json.dumps(dependencies.dependency_failed(*cause).error) for cause in distinct]
                rows = conn.execute(self._sql("end waiting", """
                    WITH gone AS (DELETE FROM {waits} WHERE queue = %(queue)s AND child = ANY(%(ids)s) RETURNING child)
                    UPDATE {jobs} j SET state = 'killed', error = (%(errors)s::text[])[e.which]::jsonb, result = NULL,
                        finished = {now}, expire_at = {now} + coalesce(j.result_ttl, %(ttl)s), dead = false,
                        owner = NULL, lease_until = NULL, kill_requested = false
                    FROM gone JOIN unnest(%(ids)s::text[], %(which)s::int4[]) AS e(child, which) USING (child)
                    WHERE j.queue = %(queue)s AND j.id = gone.child AND j.state = 'pending'
                    RETURNING j.id"""),
                    {"queue": self.queue, "ids": children, "which": which, "errors": errors,
                     "ttl": self.result_ttl}).fetchall()
                ended = [row["id"] for row in rows]
            if ended:
                conn.execute("SELECT pg_notify(c, '') FROM unnest(%s::text[]) AS c",
                             ([self.done_channel(i) for i in ended],))
            counts = self._count(conn, ended) if ended else []

    def dependents(self, job_id: str) -> list[str]:
        rows = self._call("dependents", lambda conn: conn.execute(self._sql("dependents", """
            SELECT child FROM {deps} WHERE queue = %s AND parent = %s ORDER BY child"""),
            (self.queue, job_id)).fetchall())
        return [row["child"] for row in rows]

    def get_many(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        if not job_ids:
            return []
        rows = self._call("get", lambda conn: conn.execute(self._get_many_sql(),
                                                           (self.queue, list(job_ids))).fetchall())
        found = {row["id"]: row for row in rows}
        return [None if job_id not in found else _to_record(found[job_id]) for job_id in job_ids]

    def get_many_in(self, handle: Any, job_ids: Sequence[str]) -> list[JobRecord | None]:
        """Read through the application's connection, so that jobs stored in its open transaction count."""
        if not isinstance(handle, psycopg.Connection) or not job_ids:
            return self.get_many(job_ids)  # enqueue_in refuses such a handle, in one line
        self._check_same_database(handle)
        with handle.cursor(row_factory=dict_row) as cursor:
            if not handle.autocommit and handle.info.transaction_status == pq.TransactionStatus.IDLE:
                cursor.execute("SELECT 1")  # begins the application's transaction, as enqueue_in does
            try:
                with handle.transaction():  # a savepoint: a refused read leaves their transaction usable
                    rows = cursor.execute(self._get_many_sql(), (self.queue, list(job_ids))).fetchall()
            except errors.InsufficientPrivilege as exc:
                raise ConfigurationError(f"The connection given with using= may not read the queue's tables in "
                                         f"schema {self.schema!r}: {self._scrub(exc)}; grant its user access to "
                                         f"them.") from None
        found = {row["id"]: row for row in rows}
        return [None if job_id not in found else _to_record(found[job_id]) for job_id in job_ids]

    def _get_many_sql(self) -> Any:
        return self._sql("get many", f"""
            SELECT {', '.join(FIELDS)} FROM {{jobs}} WHERE queue = %s AND id = ANY(%s)
            AND (expire_at IS NULL OR expire_at >= {{now}})""")

    def delete_expired(self, now: float, limit: int = 1000) -> int:
        # The server's clock decides, as it does for get(): ``now`` is the caller's. A finished
        # record's workflow rows go with it: its edges to its dependents, and its own set.
        # The expired ids are looked up once (MATERIALIZED) and the statement is planned afresh
        # each time (prepare=False): a plan psycopg had prepared while the tables were nearly
        # empty rescanned the whole queue for every row of it, and kept a pool's housekeeping
        # (and so its workers, which it no longer pulsed) busy for five minutes at 20,000 rows.
        row = self._call("delete expired", lambda conn: conn.execute(self._sql("delete expired", """
            WITH expired AS MATERIALIZED (
                SELECT id FROM {jobs} WHERE queue = %(queue)s AND expire_at < {now} LIMIT %(limit)s),
            gone AS (
                DELETE FROM {jobs} j USING expired WHERE j.queue = %(queue)s AND j.id = expired.id
                RETURNING j.id),
            edges AS (DELETE FROM {deps} WHERE queue = %(queue)s AND parent IN (SELECT id FROM gone)),
            sets AS (DELETE FROM {settled} WHERE queue = %(queue)s AND child IN (SELECT id FROM gone))
            SELECT count(*) AS n FROM gone"""), {"queue": self.queue, "limit": limit}, prepare=False).fetchone())
        # A rate's time in the past means what no time means.
        self._call("delete old rate times", lambda conn: conn.execute(self._sql("old rate times", """
            DELETE FROM {flow_times} WHERE queue = %s AND tat < {now} - 60"""), (self.queue,)))
        return 0 if row is None else int(row["n"])

    def expired_leases(self, now: float, limit: int = 100) -> list[JobRecord]:
        # ``now`` is the caller's clock; the server's decides when a lease ran out.
        rows = self._call("expired leases", lambda conn: conn.execute(self._sql("expired leases", f"""
            SELECT {', '.join(FIELDS)} FROM {{jobs}}
            WHERE queue = %s AND state = 'running' AND lease_until < {{now}} LIMIT %s"""),
            (self.queue, limit)).fetchall())
        return self._records(rows)

    def register_worker(self, info: WorkerInfo) -> None:
        # Readers compare last_seen with the server's clock: a skewed worker's stamps are moved onto it.
        moved = self._shift()
        self._call("register worker", lambda conn: conn.execute(self._sql("register", """
            INSERT INTO {workers} (queue, id, route, host, pid, state, started, last_seen, concurrency)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
            ON CONFLICT (queue, id) DO UPDATE SET route = excluded.route, host = excluded.host, pid = excluded.pid,
                state = excluded.state, started = excluded.started, last_seen = excluded.last_seen,
                concurrency = excluded.concurrency"""),
            (self.queue, info.id, info.route, info.host, info.pid, info.state, info.started + moved,
             info.last_seen + moved, info.concurrency)))

    def heartbeat(self, worker_id: str, state: str) -> bool:
        return self._call("heartbeat", lambda conn: conn.execute(self._sql("heartbeat", """
            UPDATE {workers} SET state = %s, last_seen = {now} WHERE queue = %s AND id = %s"""),
            (state, self.queue, worker_id)).rowcount == 1)

    def unregister_worker(self, worker_id: str) -> None:
        self._call("unregister worker", lambda conn: conn.execute(self._sql("unregister", """
            DELETE FROM {workers} WHERE queue = %s AND id = %s"""), (self.queue, worker_id)))

    def workers(self) -> list[WorkerInfo]:
        rows = self._call("workers", lambda conn: conn.execute(self._sql("workers", """
            SELECT id, queue, route, host, pid, state, started, last_seen, concurrency FROM {workers}
            WHERE queue = %s ORDER BY id"""), (self.queue,)).fetchall())
        return [WorkerInfo.from_dict(row) for row in rows]

    # -- settings --------------------------------------------------------------------

    def get_setting(self, name: str) -> str | None:
        row = self._call("get setting", lambda conn: conn.execute(self._sql("get setting", """
            SELECT value FROM {settings} WHERE queue = %s AND name = %s"""), (self.queue, name)).fetchone())
        return None if row is None else str(row["value"])

    def put_setting(self, name: str, value: str | None) -> None:
        if value is None:
            self._call("put setting", lambda conn: conn.execute(self._sql("delete setting", """
                DELETE FROM {settings} WHERE queue = %s AND name = %s"""), (self.queue, name)))
        else:
            self._call("put setting", lambda conn: conn.execute(self._sql("put setting", """
                INSERT INTO {settings} (queue, name, value) VALUES (%s, %s, %s)
                ON CONFLICT (queue, name) DO UPDATE SET value = excluded.value"""), (self.queue, name, value)))
        route = flow.route_of_setting(name)
        if route is not None:  # a resume or a new limit: the route's waiters look again
            self._flows.pop(route, None)
            self._call("notify", lambda conn: conn.execute("SELECT pg_notify(%s, '')", (self.route_channel(route),)))

    # -- throughput counters -------------------------------------------------------------

    def add_stats(self, samples: Sequence[RouteMinute]) -> None:
        rows = [(s.route, s.minute, name, int(value)) for s in samples for name, value in s.counts.items()]
        if not rows:
            return
        oldest = int((time.time() - RETENTION) // 60)
        routes, minutes, names, values = (list(column) for column in zip(*rows))

        def add(conn: psycopg.Connection[dict[str, Any]]) -> None:
            # One statement: each counter added atomically (ON CONFLICT locks its row), so pools on many
            # hosts can add at once. Not repeated after a lost reply: it may have been applied.
            conn.execute(self._sql("add stats", """
                WITH old AS (DELETE FROM {stats} WHERE queue = %s AND minute < %s)
                INSERT INTO {stats} (queue, route, minute, name, value)
                SELECT %s, r, m, n, sum(v) FROM unnest(%s::text[], %s::int8[], %s::text[], %s::int8[]) AS t(r, m, n, v)
                GROUP BY r, m, n
                ON CONFLICT (queue, minute, route, name) DO UPDATE SET value = {stats}.value + excluded.value"""),
                (self.queue, oldest, self.queue, routes, minutes, names, values))

        self._call("add stats", add, idempotent=False)

    def stats(self, since_minute: int) -> list[RouteMinute]:
        rows = self._call("stats", lambda conn: conn.execute(self._sql("stats", """
            SELECT route, minute, name, value FROM {stats} WHERE queue = %s AND minute >= %s
            ORDER BY minute, route"""), (self.queue, since_minute)).fetchall())
        found: dict[tuple[str, int], RouteMinute] = {}
        for row in rows:
            entry = found.setdefault((row["route"], int(row["minute"])), RouteMinute(row["route"], int(row["minute"])))
            entry.counts[row["name"]] = int(row["value"])
        return list(found.values())

    # -- waiting ---------------------------------------------------------------------

    def _listen(self, conn: psycopg.Connection[dict[str, Any]], channel: str) -> None:
        if channel not in self._listening:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            self._listening.add(channel)

    def _on_notify(self, notify: psycopg.Notify) -> None:
        # A handler, not psycopg's notifies() generator: with a handler psycopg keeps no backlog,
        # which would grow by one entry per enqueue while a worker is busy and never waits.
        self._notified = True

    def _wait_notified(self, conn: psycopg.Connection[dict[str, Any]], timeout: float) -> bool:
        """Whether a notification came since ``_notified`` was cleared, waiting up to ``timeout`` seconds."""
        if not self._notified and timeout > 0:
            ready, _, _ = select.select([conn.fileno()], [], [], timeout)
            if ready:
                conn.execute("SELECT 1")  # psycopg reads what arrived and hands notifications to _on_notify
        return self._notified

    def wait_for_work(self, route: str, worker_id: str, timeout: float, idle: float = 0.0) -> None:
        deadline = time.monotonic() + max(timeout, 0.0)

        def wait(conn: psycopg.Connection[dict[str, Any]]) -> None:
            # Listening before the look: work committed after it is notified, work committed before it is seen.
            self._listen(conn, self.route_channel(route))
            self._listen(conn, self.worker_channel(worker_id))  # see wake_worker
            self._notified = False  # what was heard before this look is seen by it
            if route in self._held_back:
                # The due rows were left behind by a limit or a pause: no reason to return at once.
                # Wait for a notification, the time the claim named, or a row due later.
                row = conn.execute(self._sql("next due later", """
                    SELECT due - {now} AS wait, {now} AS now FROM {jobs}
                    WHERE queue = %s AND route = %s AND state = 'pending' AND (target IS NULL OR target = %s)
                      AND due > {now} ORDER BY due, id LIMIT 1"""), (self.queue, route, worker_id)).fetchone()
                left = deadline - time.monotonic()
                if row is not None:
                    left = min(left, float(row["wait"]))
                held = self._held_back[route]
                if held:
                    left = min(left, held - float(row["now"]) if row is not None else held - self.now())
                self._wait_notified(conn, left)
                return
            else:
                row = conn.execute(self._sql("next due", """
                    SELECT due - {now} AS wait FROM {jobs}
                    WHERE queue = %s AND route = %s AND state = 'pending' AND (target IS NULL OR target = %s)
                    ORDER BY due, id LIMIT 1"""), (self.queue, route, worker_id)).fetchone()
            left = deadline - time.monotonic()
            if row is not None:
                left = min(left, float(row["wait"]))
            self._wait_notified(conn, left)

        self._call("wait for work", wait, wait=max(timeout, 0.0))

    def wake_worker(self, route: str, worker_id: str) -> None:
        # The stopping worker's select() is not cut short by the signal: a NOTIFY ends it.
        channel = self.worker_channel(worker_id)
        self._call("wake a worker", lambda conn: conn.execute("SELECT pg_notify(%s, '')", (channel,)))

    def wait_finished(self, job_id: str, timeout: float | None) -> JobRecord | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        channel = self.done_channel(job_id)

        def listen(conn: psycopg.Connection[dict[str, Any]]) -> None:
            self._listen(conn, channel)
            self._notified = False

        try:
            while True:
                self._call("wait for result", listen)
                record = self.get(job_id)
                if record is None or record.finished_state:
                    return record
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return record
                # At most a second at a time: a notification lost with a connection costs no more.
                pause = 1.0 if left is None else min(left, 1.0)
                self._call("wait for result", functools.partial(self._wait_notified, timeout=pause), wait=pause)
        finally:
            if channel in self._listening and self._conn is not None:
                self._listening.discard(channel)
                try:
                    with self._within(self._deadline):
                        self._conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(channel)))
                    if self._deadline is not None and self._deadline.expired:
                        self._drop()
                except psycopg.Error:
                    self._drop()

    def close(self) -> None:
        self._drop()
