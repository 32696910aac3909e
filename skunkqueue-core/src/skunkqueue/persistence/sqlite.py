"""The embedded default backend: one SQLite file in WAL mode.

Producers and workers in separate processes on one machine share the file.
Atomic steps run inside ``BEGIN IMMEDIATE`` transactions, which take SQLite's
single write lock, so a claim is seen by exactly one process. SQLite cannot
notify other processes, so idle workers and result waiters wait on FIFOs in a
folder beside the file (``<file>-wake``, see :mod:`.wakefolder`) that
producers and finishing workers poke after their commit; where that folder
cannot be made (a read-only folder, no FIFOs on the platform) they poll.

Where the file lives: ``url`` if given (a file path, or ``sqlite:///abs/path``;
``:memory:`` is refused because workers could not see it, and so is any other
``scheme://``), else ``$SKUNQ_SQLITE_PATH``, else
``$XDG_DATA_HOME/skunkqueue/skunkqueue.db`` (``~/.local/share/...``). Only
that last, default folder is created when missing: a mistyped path must not
create folders (possibly as root) where nobody asked for them.
"""

from __future__ import annotations

import json
import os
import random
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from skunkqueue import dependencies, flow, policy
from skunkqueue.errors import BackendUnavailable, ConfigurationError, MalformedRecord
from skunkqueue.metrics import RETENTION, RouteMinute
from skunkqueue.persistence import LEASE_KILL, LEASE_LOST, LEASE_OK, Persistence
from skunkqueue.persistence.wakefolder import WakeFolder, tag
from skunkqueue.record import (
    ERROR,
    FINISHED_STATES,
    PENDING,
    RUNNING,
    STATES,
    JobRecord,
    Outcome,
    WorkerInfo,
)
from skunkqueue.summary import QueueSummary, RouteSummary
from skunkqueue.urls import redact

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    queue TEXT NOT NULL,
    route TEXT,
    target TEXT,
    state TEXT,
    due REAL,
    lease_until REAL,
    expire_at REAL,
    record TEXT,          -- the JobRecord's other fields, as JSON
    payload BLOB,
    result BLOB
);
CREATE INDEX IF NOT EXISTS jobs_claim ON jobs (queue, route, state, due, id);
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs (state, lease_until);
CREATE INDEX IF NOT EXISTS jobs_expire ON jobs (expire_at);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    queue TEXT NOT NULL,
    info TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    queue TEXT NOT NULL,
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (queue, name)
);
-- Workflows: who waits for whom (deps), the set of each waiting record's finished parents
-- (settled: a set, so a parent counts once), and what a waiting record still needs (waits;
-- the row exists while the record waits, so deleting it is the one release).
CREATE TABLE IF NOT EXISTS deps (
    queue TEXT NOT NULL,
    parent TEXT NOT NULL,
    child TEXT NOT NULL,
    PRIMARY KEY (queue, parent, child)
);
CREATE TABLE IF NOT EXISTS settled (
    queue TEXT NOT NULL,
    child TEXT NOT NULL,
    parent TEXT NOT NULL,
    state TEXT NOT NULL,
    PRIMARY KEY (queue, child, parent)
);
CREATE TABLE IF NOT EXISTS waits (
    queue TEXT NOT NULL,
    child TEXT NOT NULL,
    left INTEGER NOT NULL,
    run_anyway INTEGER NOT NULL,
    PRIMARY KEY (queue, child)
);
-- Flow control: the GCRA time of each rate-limited key and route (skunkqueue.flow).
CREATE TABLE IF NOT EXISTS flow_times (
    queue TEXT NOT NULL,
    name TEXT NOT NULL,
    tat REAL NOT NULL,
    PRIMARY KEY (queue, name)
);
CREATE TABLE IF NOT EXISTS stats (
    queue TEXT NOT NULL,
    route TEXT NOT NULL,
    minute INTEGER NOT NULL,
    name TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (queue, minute, route, name)
);
"""

# Columns kept outside the JSON blob, because queries filter or order on them.
_COLUMNS = ("id", "queue", "route", "target", "state", "due", "lease_until", "payload", "result", "priority",
            "limit_key")


def default_path() -> Path:
    env = os.environ.get("SKUNQ_SQLITE_PATH")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "skunkqueue" / "skunkqueue.db"


# How long a write waits for SQLite's write lock before it gives up, seconds.
LOCK_TIMEOUT = 30.0
# The first and the longest pause between tries for the write lock, seconds.
# SQLite's own busy handler sleeps 1 ms, then 2, 5, 10 ms...: longer than a
# whole claim, so two workers would mostly take turns sleeping.
LOCK_PAUSE = (0.00005, 0.002)
# The file's PRAGMA user_version once its schema and every migration below are in place (0: a
# new file, or one an older version made). Raised with each change to them.
SCHEMA_VERSION = 1
_BUSY_TIMEOUT = f"PRAGMA busy_timeout={int(LOCK_TIMEOUT * 1000)}"

# A scheme-less address with one of these suffixes chooses the sqlite backend (SKUNQ_URL=./jobs.db).
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def resolve_path(url: str | None) -> Path:
    """The file a ``--url`` names, or ConfigurationError saying what is accepted."""
    if not url:
        return default_path()
    if url == ":memory:":
        raise ConfigurationError(
            "The sqlite backend needs a file that workers can open too; "
            "give a path with --url, not ':memory:'."
        )
    match = _SCHEME.match(url)
    if match:
        if match.group(1).lower() != "sqlite" or not url[len(match.group(0)):].startswith("/"):
            raise ConfigurationError(
                f"The sqlite backend takes a file path or sqlite:///absolute/path, not {redact(url)!r}."
            )
        url = url[len(match.group(0)):]
    if "\x00" in url:
        raise ConfigurationError("The sqlite path contains a NUL character.")
    return Path(url)


def _busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY: another connection holds the lock (the code is only on the exception from 3.11)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF == 5 if isinstance(code, int) else "locked" in str(exc)


def _row_to_record(row: sqlite3.Row) -> JobRecord:
    try:
        data: dict[str, Any] = json.loads(row["record"]) if row["record"] else {}
    except (TypeError, ValueError) as exc:
        raise MalformedRecord(f"record {row['id']!r} has unreadable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedRecord(f"record {row['id']!r} is not a JSON object")
    for name in _COLUMNS:
        data[name] = row[name]
    return JobRecord.from_dict(data)


# The fields a stored record's JSON leaves out when they hold these values: JobRecord.from_dict
# gives a missing field its default, as it does for a row an older version wrote.
_DEFAULTS: dict[str, Any] = {name: value for name, value in vars(JobRecord(id="", queue="", route="", func="",
                                                                          payload=b"")).items()
                             if name not in _COLUMNS}


def _record_to_row(record: JobRecord, expire_at: float | None) -> dict[str, Any]:
    # The record's own fields, read in place: to_dict's deep copy was a third of an enqueue's
    # time, and claims and finishes run this under the lock. Fields at their defaults (most of
    # the workflow, flow-control and history ones) are not written: half the JSON.
    fields = vars(record)
    row = {name: fields[name] for name in _COLUMNS}
    row["record"] = json.dumps({name: value for name, value in fields.items()
                                if name not in row and value != _DEFAULTS[name]})
    row["expire_at"] = expire_at
    row["key"] = record.key
    return row


class SQLitePersistence(Persistence):
    name = "sqlite"
    url_schemes = ("sqlite",)

    @classmethod
    def takes_url(cls, url: str) -> bool:
        # sqlite:///PATH, or a scheme-less file path: one with a SQLite suffix or a "/" in it.
        # Not host:port (no "/": it is a server's address), nor a FoundationDB cluster file.
        if super().takes_url(url):
            return True
        if "://" in url or url.endswith(".cluster"):
            return False
        return url.lower().endswith(SQLITE_SUFFIXES) or "/" in url

    def describe(self) -> str:
        return f"sqlite {self.path}"

    def __init__(self, queue: str, *, url: str | None = None, db: str | None = None,
                 **options: Any) -> None:
        super().__init__(queue, url=url, db=db, **options)
        self.path = resolve_path(url)
        creates_folder = not url and not os.environ.get("SKUNQ_SQLITE_PATH")
        if not creates_folder and not self.path.parent.is_dir():
            raise ConfigurationError(
                f"The folder of the SQLite queue file {self.path} does not exist; create it first."
            )
        self._wake = WakeFolder(self.path)
        self._pokes: list[tuple[str, int | None]] = []  # sent once the write that calls for them commits
        self._wake_lock = threading.Lock()  # a poke round lists the folder once: one round at a time
        self._watched: list[tuple[sqlite3.Connection, list[tuple[str, int | None]]]] = []  # using=: see enqueue_in
        self._watching = threading.Lock()
        self._watcher_runs = False
        self._route_tags: dict[str, str] = {}
        # Per route: (monotonic time read, paused, limit): the flow settings the claim uses.
        self._flows: dict[str, tuple[float, bool, flow.RouteLimit | None]] = {}
        # Per route whose last claim here left due records behind for a limit or a pause: when
        # one of them may be claimable (None: when a finish or a setting pokes, or on a timeout).
        self._held_back: dict[str, float | None] = {}
        try:
            if creates_folder:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=LOCK_TIMEOUT, isolation_level=None,
                                       check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._prepare_file()
        except (OSError, sqlite3.Error) as exc:
            raise BackendUnavailable(f"Cannot open the SQLite queue file {self.path}: {exc}") from None
        self.notifies = self._wake.folder() is not None

    def _prepare_file(self) -> None:
        """WAL mode, then the schema and its migrations, once per file.

        A file that says it is up to date (``user_version``) costs one read: a store opened while
        another connection holds the write lock (an application's transaction, ``using=``) must
        not wait for it. Otherwise all of it is one write under the lock, because processes that
        open a new file together (a pool and a producer started at once) got "database is locked"
        without it, busy timeout or not: a statement that read the schema, then found it changed
        by another's commit when it came to write, fails at once (WAL's SQLITE_BUSY_SNAPSHOT).
        ``BEGIN IMMEDIATE`` waits its turn instead.
        """
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        if self._schema_version() >= SCHEMA_VERSION:
            return
        with self._write() as conn:
            if self._schema_version() < SCHEMA_VERSION:  # else another process did it while this one waited
                for statement in _SCHEMA.split(";"):
                    conn.execute(statement)
                self._migrate(conn)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        """Bring a file made by an older version up to date (inside the write of :meth:`_prepare_file`)."""
        columns = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
        if "key" not in columns:
            conn.execute("ALTER TABLE jobs ADD COLUMN key TEXT")
        conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS jobs_key ON jobs (queue, key) WHERE key IS NOT NULL")
        # Flow control: a priority and a limit key per row (older files: 0 and none).
        if "priority" not in columns:
            conn.execute("ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")
        if "limit_key" not in columns:
            conn.execute("ALTER TABLE jobs ADD COLUMN limit_key TEXT")
        # The claim walks one priority at a time (highest first), in (due, id) order within it.
        # Pending rows only: a claim takes a row out of it and a finish does not touch it, where a
        # full index (jobs_order, before) moved each row twice more (30-40 us of a claim and finish).
        conn.execute("DROP INDEX IF EXISTS jobs_order")
        conn.execute(f"CREATE INDEX IF NOT EXISTS jobs_pending ON jobs (queue, route, priority, due, id) "
                     f"WHERE state='{PENDING}'")
        # A key's slots: its running rows with a live lease.
        conn.execute("CREATE INDEX IF NOT EXISTS jobs_limit ON jobs (queue, limit_key, state, lease_until) "
                     "WHERE limit_key IS NOT NULL")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One atomic read-modify-write step under SQLite's write lock."""
        self._begin()
        self._pokes.clear()
        try:
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                self._pokes.clear()
                raise
            self._db.execute("COMMIT")
        finally:
            # Reads outside writes keep SQLite's busy handler. Restored once the lock is
            # released: inside the transaction nothing waits for a lock any more.
            self._db.execute(_BUSY_TIMEOUT)
        if self._pokes:
            self._send_pokes(self._pokes)
            self._pokes.clear()

    def _send_pokes(self, pokes: Sequence[tuple[str, int | None]]) -> None:
        with self._wake_lock, self._wake.round():
            for prefix, wanted in pokes:
                self._wake.poke(prefix, wanted)

    def _begin(self) -> None:
        """BEGIN IMMEDIATE, trying for the lock again every 50 µs or so instead of SQLite's 1 ms and more."""
        db = self._db
        db.execute("PRAGMA busy_timeout=0")
        deadline, pause = time.monotonic() + LOCK_TIMEOUT, LOCK_PAUSE[0]
        try:
            while True:
                try:
                    db.execute("BEGIN IMMEDIATE")
                    return  # _write restores the busy timeout after the commit
                except sqlite3.OperationalError as exc:
                    if not _busy(exc) or time.monotonic() > deadline:
                        raise
                # Jitter, so that two waiters do not keep colliding in step.
                time.sleep(pause * random.uniform(0.5, 1.5))
                pause = min(pause * 2, LOCK_PAUSE[1])
        except BaseException:
            db.execute(_BUSY_TIMEOUT)
            raise

    def _route_tag(self, route: str) -> str:
        found = self._route_tags.get(route)
        if found is None:
            found = self._route_tags[route] = "w" + tag(self.queue, route)
        return found

    def _poke_workers(self, route: str, target: str | None, records: int = 1) -> None:
        # Only as many waiters as there are records: waking them all would
        # have every idle worker race for the write lock to find nothing.
        self._pokes.append((self._poke_prefix(route, target), records))

    def _poke_prefix(self, route: str, target: str | None) -> str:
        prefix = self._route_tag(route) + "."
        return prefix + tag(target) + "." if target else prefix

    def _store(self, conn: sqlite3.Connection, record: JobRecord) -> bool:
        """Insert a new record; False, changing nothing, when its id is stored already.

        Ids are new per fire: a stored one is the same record sent again, which a worker may
        be running (see :meth:`JobStore.enqueue`). A conflict on any other constraint (a key)
        still raises.
        """
        expire = (record.finished or time.time()) + self.ttl_of(record) if record.finished_state else None
        row = _record_to_row(record, expire)
        return conn.execute(
            f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))}) ON CONFLICT (id) DO NOTHING",
            tuple(row.values()),
        ).rowcount == 1

    def _update(self, conn: sqlite3.Connection, record: JobRecord) -> None:
        """Rewrite the row of a record whose id, queue, route, payload and key stay as they were.

        Claims and finishes run it under the write lock: it touches only the columns that change.
        """
        expire = (record.finished or time.time()) + self.ttl_of(record) if record.finished_state else None
        row = _record_to_row(record, expire)
        conn.execute("UPDATE jobs SET target=?, state=?, due=?, lease_until=?, result=?, record=?, expire_at=? "
                     "WHERE id=?", (row["target"], row["state"], row["due"], row["lease_until"], row["result"],
                                    row["record"], expire, record.id))

    def _quarantine(self, conn: sqlite3.Connection, job_id: str, why: str) -> None:
        # Keep the damaged row for inspection but take it out of every route.
        error = policy.quarantined(why).error
        conn.execute(
            "UPDATE jobs SET state=?, record=json_set(CASE WHEN json_valid(record) THEN record "
            "ELSE '{}' END, '$.error', json(?), '$.dead', json('true')), expire_at=? WHERE id=?",
            (ERROR, json.dumps(error), time.time() + self.result_ttl, job_id),
        )

    # -- producers ---------------------------------------------------------------

    def enqueue(self, records: Sequence[JobRecord]) -> None:
        self.enqueue_keyed(records)

    def enqueue_keyed(self, records: Sequence[JobRecord]) -> list[str]:
        with self._write() as conn:  # the write lock makes check-and-insert one step
            holders, stored = self._store_all(conn, records)
            for (route, target), n in stored.items():
                self._poke_workers(route, target, n)
        return holders

    def _store_all(self, conn: Any, records: Sequence[JobRecord]
                   ) -> tuple[list[str], dict[tuple[str, str | None], int]]:
        """Store ``records`` in ``conn``'s open write transaction (a key held returns its holder);
        also how many claimable records went to each (route, target), for the pokes."""
        holders = []
        now = time.time()
        stored: dict[tuple[str, str | None], int] = {}
        for record in records:
            if record.key is not None:
                row = conn.execute("SELECT id, expire_at FROM jobs WHERE queue=? AND key=?",
                                   (self.queue, record.key)).fetchone()
                if row is not None and (row["expire_at"] is None or row["expire_at"] >= now):
                    holders.append(row["id"])
                    continue
                if row is not None:  # expired, not yet deleted: the key is free
                    conn.execute("DELETE FROM jobs WHERE id=?", (row["id"],))
            holders.append(record.id)
            if not self._store(conn, record):
                continue  # sent again: stored already, with its edges, and maybe running
            if record.parents:
                self._attach(conn, record)
                continue
            if record.state == PENDING:
                where = (record.route, record.target)
                stored[where] = stored.get(where, 0) + 1
        return holders, stored

    supports_using = True
    using_blocks_writers = True  # SQLite has one writer per file: the app's transaction holds it

    def enqueue_in(self, handle: Any, records: Sequence[JobRecord]) -> list[str]:
        """Store the records in the open transaction of ``handle``, an ``sqlite3.Connection`` to this
        queue's own file.

        Inside a savepoint, so a failure here leaves the application's transaction usable. A
        connection with no transaction open gets one begun, as the ``sqlite3`` module itself
        would begin one before a write (in autocommit mode, ``isolation_level=None``, the jobs
        are stored at once). Python's ``sqlite3`` has no commit hook, so the idle workers' wake-up
        is sent by a watcher thread within a few milliseconds of the transaction's end.
        """
        if not isinstance(handle, sqlite3.Connection):
            raise ConfigurationError(
                f"using= takes an sqlite3.Connection to the queue's file ({self.path}) for the sqlite backend, not "
                f"{type(handle).__module__}.{type(handle).__qualname__}.")
        if not records:
            return []
        try:
            main = next((row[2] for row in handle.execute("PRAGMA database_list") if row[1] == "main"), "")
        except sqlite3.Error as exc:
            raise ConfigurationError(f"The connection given with using= cannot be used: {exc}.") from None
        if not main or not os.path.exists(main) or not os.path.samefile(main, self.path):
            raise ConfigurationError(f"The connection given with using= is to {main or 'a memory database'!r}, "
                                     f"not the queue's file {str(self.path)!r}; connect to that file.")
        if handle.isolation_level is not None and not handle.in_transaction:
            handle.execute("BEGIN")  # the application's transaction; ours is a savepoint in it
        cursor = handle.cursor()
        cursor.row_factory = sqlite3.Row
        cursor.execute("SAVEPOINT skunq_enqueue")
        try:
            holders, stored = self._store_all(cursor, records)
        except BaseException:
            cursor.execute("ROLLBACK TO skunq_enqueue")
            cursor.execute("RELEASE skunq_enqueue")
            raise
        finally:
            cursor.row_factory = None
        cursor.execute("RELEASE skunq_enqueue")
        cursor.close()
        pokes: list[tuple[str, int | None]] = [(self._poke_prefix(route, target), n)
                                               for (route, target), n in stored.items()]
        if pokes:
            self._poke_after(handle, pokes)
        return holders

    def _poke_after(self, handle: sqlite3.Connection, pokes: list[tuple[str, int | None]]) -> None:
        """Send ``pokes`` once ``handle``'s transaction has ended (committed, rolled back or closed)."""
        with self._watching:
            self._watched.append((handle, pokes))
            if self._watcher_runs:
                return
            self._watcher_runs = True
        threading.Thread(target=self._watch, name="skunq-sqlite-using", daemon=True).start()

    def _watch(self) -> None:
        # in_transaction may be read from any thread (it asks SQLite, which keeps it per connection).
        while True:
            with self._watching:
                if not self._watched:
                    self._watcher_runs = False
                    return
                ended: list[tuple[sqlite3.Connection, list[tuple[str, int | None]]]] = []
                open_: list[tuple[sqlite3.Connection, list[tuple[str, int | None]]]] = []
                for handle, pokes in self._watched:
                    try:
                        (open_ if handle.in_transaction else ended).append((handle, pokes))
                    except sqlite3.ProgrammingError:  # closed: its transaction is over
                        ended.append((handle, pokes))
                self._watched = open_
            if ended:
                self._send_pokes([poke for _, pokes in ended for poke in pokes])
            else:
                time.sleep(0.002)

    def get(self, job_id: str) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id=? AND queue=?", (job_id, self.queue)).fetchone()
        return _row_to_record(row) if row else None

    def get_many(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        return self._get_many(self._db.cursor(), job_ids)

    def get_many_in(self, handle: Any, job_ids: Sequence[str]) -> list[JobRecord | None]:
        if not isinstance(handle, sqlite3.Connection):
            return self.get_many(job_ids)  # enqueue_in refuses such a handle, in one line
        cursor = handle.cursor()
        cursor.row_factory = sqlite3.Row
        try:
            return self._get_many(cursor, job_ids)
        except sqlite3.OperationalError:  # a connection to another file (no jobs table): enqueue_in says so
            return [None] * len(job_ids)
        finally:
            cursor.close()

    def _get_many(self, cursor: sqlite3.Cursor, job_ids: Sequence[str]) -> list[JobRecord | None]:
        found: dict[str, JobRecord] = {}
        for start in range(0, len(job_ids), 500):  # under SQLite's limit on host parameters
            chunk = list(job_ids[start:start + 500])
            for row in cursor.execute(f"SELECT * FROM jobs WHERE queue=? AND id IN ({','.join('?' * len(chunk))})",
                                      (self.queue, *chunk)):
                found[row["id"]] = _row_to_record(row)
        return [found.get(job_id) for job_id in job_ids]

    # -- workflows: see the Persistence docstring -------------------------------------

    supports_workflows = True

    def dependents(self, job_id: str) -> list[str]:
        return [child for (child,) in self._db.execute(
            "SELECT child FROM deps WHERE queue=? AND parent=? ORDER BY child", (self.queue, job_id))]

    def _attach(self, conn: sqlite3.Connection, record: JobRecord) -> None:
        """Make a stored waiting record a dependent of its parents; count those already finished."""
        parents = dependencies.unique(record.parents or ())
        conn.execute("INSERT OR REPLACE INTO waits (queue, child, left, run_anyway) VALUES (?, ?, ?, ?)",
                     (self.queue, record.id, len(parents), int(dependencies.runs_anyway(record))))
        conn.executemany("INSERT OR IGNORE INTO deps (queue, parent, child) VALUES (?, ?, ?)",
                         [(self.queue, parent, record.id) for parent in parents])
        for parent in parents:
            row = conn.execute("SELECT state FROM jobs WHERE id=? AND queue=?", (parent, self.queue)).fetchone()
            if row is None:
                self._settle(conn, parent, dependencies.missing_parent_state(), [record.id])
            elif row["state"] in FINISHED_STATES:
                self._settle(conn, parent, row["state"], [record.id])

    def _settle(self, conn: sqlite3.Connection, parent: str, state: str, children: list[str] | None = None) -> None:
        """Count a finished parent into its dependents' sets; release or end those it completes.

        Runs inside the write transaction of the parent's finish. A dependent
        ended here counts for its own dependents in turn (a worklist, not
        recursion: a chain may be long).
        """
        work: list[tuple[str, str, list[str] | None]] = [(parent, state, children)]
        while work:
            parent, state, children = work.pop()
            if children is None:
                children = [child for (child,) in conn.execute(
                    "SELECT child FROM deps WHERE queue=? AND parent=?", (self.queue, parent))]
            for child in children:
                if not conn.execute("INSERT OR IGNORE INTO settled (queue, child, parent, state) VALUES (?, ?, ?, ?)",
                                    (self.queue, child, parent, state)).rowcount:
                    continue  # this parent was counted already
                wait = conn.execute("SELECT left, run_anyway FROM waits WHERE queue=? AND child=?",
                                    (self.queue, child)).fetchone()
                if wait is None:
                    continue  # released, or ended, already
                if dependencies.kills_dependent(state, bool(wait["run_anyway"])):
                    conn.execute("DELETE FROM waits WHERE queue=? AND child=?", (self.queue, child))
                    if self._end_waiting(conn, child, dependencies.dependency_failed(parent, state)):
                        work.append((child, "killed", None))
                elif wait["left"] <= 1:
                    conn.execute("DELETE FROM waits WHERE queue=? AND child=?", (self.queue, child))
                    self._release(conn, child)
                else:
                    conn.execute("UPDATE waits SET left=left-1 WHERE queue=? AND child=?", (self.queue, child))

    def _release(self, conn: sqlite3.Connection, child: str) -> None:
        row = conn.execute("SELECT route, target FROM jobs WHERE id=? AND queue=? AND state=? AND due>=?",
                           (child, self.queue, PENDING, dependencies.WAITING_DUE)).fetchone()
        if row is None:
            return  # killed or purged while it waited
        conn.execute("UPDATE jobs SET due=? WHERE id=?", (time.time(), child))
        self._poke_workers(row["route"], row["target"])

    def _end_waiting(self, conn: sqlite3.Connection, child: str, outcome: Outcome) -> bool:
        row = conn.execute("SELECT * FROM jobs WHERE id=? AND queue=?", (child, self.queue)).fetchone()
        if row is None:
            return False
        record = _row_to_record(row)
        if record.state != PENDING:
            return False
        self._update(conn, outcome.apply_to(record, time.time()))
        self._pokes.append((self._done_tag(child) + ".", None))
        return True

    def list_jobs(self, *, route: str | None = None, state: str | None = None,
                  dead: bool | None = None, limit: int = 1000) -> list[JobRecord]:
        sql, args = "SELECT * FROM jobs WHERE queue=?", [self.queue]
        if route is not None:
            sql, args = sql + " AND route=?", [*args, route]
        if state is not None:
            sql, args = sql + " AND state=?", [*args, state]
        records = []
        for row in self._db.execute(sql + " ORDER BY due, id", args):
            try:
                record = _row_to_record(row)
            except MalformedRecord:
                continue
            if dead is None or record.dead == dead:
                records.append(record)
                if len(records) >= limit:
                    break
        return records

    # Rows one list_page call reads past its cursor, however few of them match its filters.
    PAGE_SCAN = 1000

    pages_newest_first = True

    def list_page(self, *, route: str | None = None, state: str | None = None, dead: bool | None = None,
                  limit: int = 100, after: str | None = None,
                  newest: bool = False) -> tuple[list[JobRecord], str | None]:
        # Keyset paging in id (creation) order on the primary key: a call reads at most PAGE_SCAN rows,
        # however deep the page and however rarely its filters match. The default offset cursor re-read
        # every earlier page (105,000 jobs: 459 s for the monitor's function filter). The cursor is
        # "i:<the last id looked at>" ("n:" newest first); a page may come back short, with a cursor,
        # when few rows match.
        mark = "n:" if newest else "i:"
        if after is not None and not after.startswith(mark):
            raise ValueError(f"{after!r} is not a page cursor of this store")
        scan = max(limit, self.PAGE_SCAN)
        # +queue: without it the planner takes the claim index for queue=? and sorts the whole queue.
        if newest:
            below = "AND id<?" if after else ""
            rows = self._db.execute(f"SELECT * FROM jobs WHERE +queue=? {below} ORDER BY id DESC LIMIT ?",
                                    (self.queue, *([after[2:]] if after else []), scan)).fetchall()
        else:
            rows = self._db.execute("SELECT * FROM jobs WHERE +queue=? AND id>? ORDER BY id LIMIT ?",
                                    (self.queue, after[2:] if after else "", scan)).fetchall()
        records: list[JobRecord] = []
        for n, row in enumerate(rows, 1):
            if (route is not None and row["route"] != route) or (state is not None and row["state"] != state):
                continue
            try:
                record = _row_to_record(row)
            except MalformedRecord:
                continue
            if dead is None or record.dead == dead:
                records.append(record)
                if len(records) == limit:
                    more = n < len(rows) or len(rows) == scan
                    return records, f"{mark}{row['id']}" if more else None
        return records, f"{mark}{rows[-1]['id']}" if len(rows) == scan else None

    def counts(self) -> dict[tuple[str, str], int]:
        rows = self._db.execute(
            "SELECT route, state, COUNT(*) FROM jobs WHERE queue=? GROUP BY route, state", (self.queue,)
        )
        return {(str(route), str(state)): n for route, state, n in rows}

    def summary(self, now: float | None = None) -> QueueSummary:
        # One GROUP BY on the claim index, which covers (queue, route, state), reading the dead flag of
        # error rows only, and one index seek per route for the longest wait: the default decoded
        # every dead letter (10,000 at 100,000 jobs) in Python.
        now = time.time() if now is None else now
        found: dict[str, tuple[dict[str, int], int]] = {}
        for route, state, n, dead in self._db.execute(
                "SELECT route, state, COUNT(*), SUM(CASE WHEN state=? AND json_valid(record) "
                "AND json_extract(record, '$.dead') THEN 1 ELSE 0 END) FROM jobs WHERE queue=? "
                "GROUP BY route, state", (ERROR, self.queue)):
            states, dead_count = found.setdefault(str(route), (dict.fromkeys(STATES, 0), 0))
            if state in states:
                states[state] = n
            found[str(route)] = (states, dead_count + int(dead or 0))
        routes = []
        for route, (states, dead_count) in sorted(found.items()):
            oldest = None
            if states[PENDING]:
                (first,) = self._db.execute("SELECT MIN(due) FROM jobs WHERE queue=? AND route=? AND state=?",
                                            (self.queue, route, PENDING)).fetchone()
                oldest = first if first is not None and first <= now else None
            routes.append(RouteSummary(route, states, dead_count, oldest))
        return QueueSummary(routes)

    def purge(self, route: str, *, target: str | None = None) -> int:
        sql, args = "DELETE FROM jobs WHERE queue=? AND route=? AND state=?", [self.queue, route, PENDING]
        if target is not None:
            sql, args = sql + " AND target=?", [*args, target]
        with self._write() as conn:
            return conn.execute(sql, args).rowcount

    def request_kill(self, job_id: str) -> bool:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET record=json_set(record, '$.kill_requested', json('true')) "
                "WHERE id=? AND queue=? AND state=?", (job_id, self.queue, RUNNING),
            )
            return cur.rowcount == 1

    # -- workers -----------------------------------------------------------------

    def claim(self, route: str, worker_id: str, lease: float, limit: int = 1) -> list[JobRecord]:
        with self._write() as conn:
            return self._claim(conn, route, worker_id, lease, limit)

    supports_priorities = True
    supports_limits = True
    supports_pause = True

    def _route_flow(self, route: str) -> tuple[bool, flow.RouteLimit | None]:
        """The route's paused flag and limit, read at most SETTINGS_TTL seconds ago."""
        now = time.monotonic()
        found = self._flows.get(route)
        if found is None or now - found[0] > flow.SETTINGS_TTL:
            names = (flow.pause_setting(route), flow.limit_setting(route))
            values = dict(self._db.execute("SELECT name, value FROM settings WHERE queue=? AND name IN (?, ?)",
                                           (self.queue, *names)).fetchall())
            found = self._flows[route] = (now, names[0] in values, flow.RouteLimit.from_json(values.get(names[1])))
        return found[1], found[2]

    def _candidates(self, conn: sqlite3.Connection, route: str, worker_id: str, now: float,
                    first: int, page: int, extra: str = "",
                    extra_args: tuple[Any, ...] = ()) -> Iterator[sqlite3.Row]:
        """Due pending rows of the route in claim order: priority descending, then due, then id.

        One priority at a time, each found with an index seek, so that records due later (a
        priority's delayed ones) are never read. ``first`` rows in the first page, ``page`` in
        each after it. ``extra``: more columns of every page (scalar subqueries, run once per
        statement), with their arguments.
        """
        # The state as a literal, so that the planner sees the partial index's condition (jobs_pending)
        # in the statement itself, whatever the SQLite build does with bound values.
        base = f"FROM jobs WHERE queue=? AND route=? AND state='{PENDING}'"
        top = f"(SELECT MAX(priority) {base})"
        level: Any = None
        size = first
        while True:
            after: tuple[Any, ...] = ()
            while True:
                # The first page names the top priority by a subquery: the common claim is one statement.
                rows = conn.execute(
                    f"SELECT *{extra} {base} AND priority={top if level is None else '?'} AND due<=? "
                    "AND (target IS NULL OR target=?)" + (" AND (due>? OR (due=? AND id>?))" if after else "")
                    + " ORDER BY due, id LIMIT ?",
                    (*extra_args, self.queue, route,
                     *((self.queue, route) if level is None else (level,)),
                     now, worker_id, *after, size)).fetchall()
                asked, size = size, page
                if level is None:
                    if not rows:
                        (level,) = conn.execute(f"SELECT MAX(priority) {base}", (self.queue, route)).fetchone()
                        if level is None:
                            return
                        break  # the top priority has nothing due yet: on to the next
                    level = rows[0]["priority"]
                yield from rows
                if len(rows) < asked:
                    break
                last = rows[-1]
                after = (last["due"], last["due"], last["id"])
            (level,) = conn.execute(f"SELECT MAX(priority) {base} AND priority<?",
                                    (self.queue, route, level)).fetchone()
            if level is None:
                return

    def _rate_time(self, conn: sqlite3.Connection, name: str) -> float | None:
        row = conn.execute("SELECT tat FROM flow_times WHERE queue=? AND name=?", (self.queue, name)).fetchone()
        return None if row is None else float(row[0])

    def _claim(self, conn: sqlite3.Connection, route: str, worker_id: str, lease: float,
               limit: int) -> list[JobRecord]:
        # The flow rules are flow.Admission's; the common case (no limit anywhere) costs two index
        # seeks more than a plain (due, id) read, and a route limit a few columns of the first page.
        claimed: list[JobRecord] = []
        now = time.time()
        paused, route_limit = self._route_flow(route)
        if paused:
            self._held_back[route] = None
            return claimed
        admission = flow.Admission(now, route, route_limit, lambda name: self._rate_time(conn, name))
        extra, extra_args = "", tuple[Any, ...]()
        if route_limit is not None:
            # The route's live leases and its rate's time with the candidates, in the same statement.
            extra = (", (SELECT COUNT(*) FROM jobs r WHERE r.queue=? AND r.route=? AND r.state=? "
                     "AND r.lease_until>?) AS flow_route_running, "
                     "(SELECT tat FROM flow_times WHERE queue=? AND name=?) AS flow_route_tat")
            extra_args = (self.queue, route, RUNNING, now, self.queue, admission.route_name)
        room = limit
        rated = route_limit is not None and route_limit.interval is not None

        def key_full(key: str, cap: int | None) -> float | None:
            return self._key_blocked(conn, key, cap, now)

        # The first page holds as many rows as are asked for when no route limit can hold rows back
        # (a record's own key still may: then the next page, 8 more, is one statement more); nine
        # rows read and decoded for a claim of one cost a plain claim 20 us.
        first = limit + 8 if route_limit is not None else limit
        for looked, row in enumerate(self._candidates(conn, route, worker_id, now, first, limit + 8, extra,
                                                      extra_args), 1):
            if looked == 1 and route_limit is not None:
                tat = row["flow_route_tat"]
                admission.known(admission.route_name, None if tat is None else float(tat))
                if route_limit.concurrency is not None:
                    room = min(room, route_limit.concurrency - row["flow_route_running"])
                    if room <= 0:
                        admission.hold(self._first_lease_end(conn, route, now))
                        break
            if looked > flow.FLOW_SCAN:
                admission.hold(None)
                break
            try:
                record = _row_to_record(row)
            except MalformedRecord as exc:
                self._quarantine(conn, row["id"], str(exc))
                continue
            if record.limit_key is not None or rated:  # else nothing can stop it
                decision = admission.admit(record.limit_key, record.limit_concurrency, record.limit_interval,
                                           record.limit_burst, key_full)
                if decision == flow.STOP:
                    break
                if decision == flow.SKIP:
                    continue
            record.claim_by(worker_id, now, lease)
            self._update(conn, record)
            claimed.append(record)
            if len(claimed) >= room:
                break
        # Read last, under the write lock: every later claim's now comes after it.
        written = admission.to_write(time.time()) if admission.changed else []
        if written:
            conn.executemany("INSERT INTO flow_times (queue, name, tat) VALUES (?, ?, ?) "
                             "ON CONFLICT (queue, name) DO UPDATE SET tat=excluded.tat",
                             [(self.queue, name, at) for name, at in written])
        if admission.held_back and len(claimed) < limit:
            self._held_back[route] = admission.wake
        else:
            self._held_back.pop(route, None)
        return claimed

    def _first_lease_end(self, conn: sqlite3.Connection, route: str, now: float) -> float | None:
        (first,) = conn.execute("SELECT MIN(lease_until) FROM jobs WHERE queue=? AND route=? AND state=? "
                                "AND lease_until>?", (self.queue, route, RUNNING, now)).fetchone()
        return None if first is None else float(first)

    def _key_blocked(self, conn: sqlite3.Connection, key: str, cap: int | None, now: float) -> float | None:
        """None if the key has a free slot; else when the first slot's lease runs out (0: unknown)."""
        if cap is None:
            return None
        running, first_end = conn.execute(
            "SELECT COUNT(*), MIN(lease_until) FROM jobs WHERE queue=? AND limit_key=? AND state=? "
            "AND lease_until>?", (self.queue, key, RUNNING, now)).fetchone()
        if running < cap:
            return None
        return float(first_end) if first_end is not None else 0.0

    def rate_times(self, names: Sequence[str]) -> dict[str, float]:
        now = time.time()
        found: dict[str, float] = {}
        for start in range(0, len(names), 500):
            chunk = list(names[start:start + 500])
            for name, tat in self._db.execute(
                    f"SELECT name, tat FROM flow_times WHERE queue=? AND name IN ({','.join('?' * len(chunk))})",
                    (self.queue, *chunk)):
                if tat > now:
                    found[name] = float(tat)
        return found

    def renew(self, worker_id: str, leases: Sequence[tuple[str, int]], lease: float) -> dict[str, str]:
        statuses: dict[str, str] = {}
        with self._write() as conn:
            until = time.time() + lease
            for job_id, token in leases:
                row = conn.execute("SELECT * FROM jobs WHERE id=? AND queue=?", (job_id, self.queue)).fetchone()
                record = _row_to_record(row) if row else None
                if record is None or record.state != RUNNING or record.token != token:
                    statuses[job_id] = LEASE_LOST
                    continue
                record.lease_until = until
                self._update(conn, record)
                statuses[job_id] = LEASE_KILL if record.kill_requested else LEASE_OK
        return statuses

    def finish(self, job_id: str, token: int, outcome: Outcome, *, expect: str = RUNNING) -> bool:
        with self._write() as conn:
            return self._finish(conn, job_id, token, outcome, expect)

    def finish_and_claim(self, job_id: str, token: int, outcome: Outcome, route: str, worker_id: str,
                         lease: float, limit: int = 1) -> tuple[bool, list[JobRecord]]:
        # One write transaction instead of two: the write lock is what workers queue on.
        with self._write() as conn:
            done = self._finish(conn, job_id, token, outcome, RUNNING)
            return done, self._claim(conn, route, worker_id, lease, limit)

    def _finish(self, conn: sqlite3.Connection, job_id: str, token: int, outcome: Outcome,
                expect: str) -> bool:
        # With the row, the live leases of its key (if it has one) and, where this instance saw a
        # concurrency limit on a route, of its route: whether the finish frees a slot someone waits for;
        # and whether it has dependents to count down (most records have none: no statement for them).
        now = time.time()
        route_count = ("(SELECT COUNT(*) FROM jobs r WHERE r.queue=jobs.queue AND r.route=jobs.route AND "
                       "r.state='running' AND r.lease_until>?)") if self._route_limits_seen() else "?"
        row = conn.execute(
            "SELECT *, CASE WHEN limit_key IS NULL OR state<>'running' THEN 0 ELSE (SELECT COUNT(*) FROM jobs k "
            "WHERE k.queue=jobs.queue AND k.limit_key=jobs.limit_key AND k.state='running' AND k.lease_until>?) "
            f"END AS key_slots, {route_count} AS route_slots, "
            "EXISTS (SELECT 1 FROM deps d WHERE d.queue=jobs.queue AND d.parent=jobs.id) AS has_dependents "
            "FROM jobs WHERE id=? AND queue=?",
            (now, now, job_id, self.queue)).fetchone()
        if row is None:
            return False
        record = _row_to_record(row)
        if record.state != expect or record.token != token:
            return False
        frees_slot = record.state == RUNNING and self._was_full(record, row["key_slots"], row["route_slots"])
        record = outcome.apply_to(record, time.time())
        self._update(conn, record)
        if frees_slot:  # a worker waiting on this slot's limit may claim now
            self._poke_workers(record.route, None)
        if record.finished_state:
            self._pokes.append((self._done_tag(job_id) + ".", None))
            if record.parents:
                conn.execute("DELETE FROM waits WHERE queue=? AND child=?", (self.queue, job_id))
            if row["has_dependents"]:  # read under this write lock: none can be attached meanwhile
                self._settle(conn, job_id, record.state)
        elif record.state == PENDING:  # a retry or a lease handed back
            self._poke_workers(record.route, record.target)
        return True

    def _route_limits_seen(self) -> bool:
        return any(limit is not None and limit.concurrency is not None for _, _, limit in self._flows.values())

    def _was_full(self, record: JobRecord, key_slots: Any, route_slots: Any) -> bool:
        """True when this running record held one of the last slots of its key or its route (the live
        leases counted with the row): a worker may be waiting for it. Most finishes free no one, and a
        poke costs more than the count."""
        if record.limit_concurrency is not None and (key_slots or 0) >= record.limit_concurrency:
            return True
        found = self._flows.get(record.route)
        limit = found[2] if found is not None else None
        return limit is not None and limit.concurrency is not None and (route_slots or 0) >= limit.concurrency

    def _done_tag(self, job_id: str) -> str:
        return "d" + tag(self.queue, job_id)

    def delete_expired(self, now: float, limit: int = 1000) -> int:
        with self._write() as conn:
            ids = conn.execute("SELECT id FROM jobs WHERE queue=? AND expire_at < ? LIMIT ?",
                               (self.queue, now, limit)).fetchall()
            conn.executemany("DELETE FROM jobs WHERE id=?", ids)
            # A finished record's workflow rows go with it (a finished parent's edges, its own set).
            conn.executemany("DELETE FROM deps WHERE queue=? AND parent=?", [(self.queue, i) for (i,) in ids])
            conn.executemany("DELETE FROM settled WHERE queue=? AND child=?", [(self.queue, i) for (i,) in ids])
            # A rate's time in the past means what no time means.
            conn.execute("DELETE FROM flow_times WHERE queue=? AND tat < ?", (self.queue, now - 60))
            return len(ids)

    def expired_leases(self, now: float, limit: int = 100) -> list[JobRecord]:
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE state=? AND lease_until<? AND queue=? LIMIT ?",
            (RUNNING, now, self.queue, limit),
        )
        records = []
        for row in rows:
            try:
                records.append(_row_to_record(row))
            except MalformedRecord:
                continue
        return records

    def register_worker(self, info: WorkerInfo) -> None:
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO workers (id, queue, info) VALUES (?, ?, ?)",
                         (info.id, self.queue, json.dumps(info.to_dict())))

    def heartbeat(self, worker_id: str, state: str) -> bool:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE workers SET info=json_set(info, '$.state', ?, '$.last_seen', ?) WHERE id=? AND queue=?",
                (state, time.time(), worker_id, self.queue),
            )
            return cur.rowcount == 1

    def unregister_worker(self, worker_id: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM workers WHERE id=? AND queue=?", (worker_id, self.queue))

    def workers(self) -> list[WorkerInfo]:
        rows = self._db.execute("SELECT info FROM workers WHERE queue=? ORDER BY id", (self.queue,))
        return [WorkerInfo.from_dict(json.loads(info)) for (info,) in rows]

    # -- settings -------------------------------------------------------------------

    def get_setting(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM settings WHERE queue=? AND name=?", (self.queue, name)).fetchone()
        return None if row is None else str(row["value"])

    def put_setting(self, name: str, value: str | None) -> None:
        with self._write() as conn:
            if value is None:
                conn.execute("DELETE FROM settings WHERE queue=? AND name=?", (self.queue, name))
            else:
                conn.execute("INSERT OR REPLACE INTO settings (queue, name, value) VALUES (?, ?, ?)",
                             (self.queue, name, value))
            route = flow.route_of_setting(name)
            if route is not None:  # a resume or a new limit: every waiter of the route looks again
                self._flows.pop(route, None)
                self._pokes.append((self._route_tag(route) + ".", None))

    # -- throughput counters ------------------------------------------------------

    def add_stats(self, samples: Sequence[RouteMinute]) -> None:
        rows = [(self.queue, s.route, s.minute, name, value) for s in samples for name, value in s.counts.items()]
        if not rows:
            return
        oldest = int((time.time() - RETENTION) // 60)
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO stats (queue, route, minute, name, value) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (queue, minute, route, name) DO UPDATE SET value = value + excluded.value",
                rows)
            conn.execute("DELETE FROM stats WHERE queue=? AND minute < ?", (self.queue, oldest))

    def stats(self, since_minute: int) -> list[RouteMinute]:
        found: dict[tuple[str, int], RouteMinute] = {}
        for route, minute, name, value in self._db.execute(
                "SELECT route, minute, name, value FROM stats WHERE queue=? AND minute >= ? "
                "ORDER BY minute, route", (self.queue, since_minute)):
            entry = found.setdefault((route, minute), RouteMinute(route, minute))
            entry.counts[name] = value
        return list(found.values())

    # -- waiting ----------------------------------------------------------------------

    def _next_due(self, route: str, worker_id: str) -> float | None:
        row = self._db.execute(
            "SELECT due FROM jobs WHERE queue=? AND route=? AND state=? AND (target IS NULL OR target=?) "
            "ORDER BY due LIMIT 1", (self.queue, route, PENDING, worker_id)).fetchone()
        return None if row is None else float(row[0] or 0)

    def _next_due_after(self, route: str, worker_id: str, now: float) -> float | None:
        row = self._db.execute(
            "SELECT due FROM jobs WHERE queue=? AND route=? AND state=? AND due>? AND (target IS NULL OR target=?) "
            "ORDER BY due LIMIT 1", (self.queue, route, PENDING, now, worker_id)).fetchone()
        return None if row is None else float(row[0])

    def wait_for_work(self, route: str, worker_id: str, timeout: float, idle: float = 0.0) -> None:
        # The FIFO exists before the look at the table: work committed after
        # the look is poked, work committed before it is seen by it.
        with self._wake.listen(f"{self._route_tag(route)}.{tag(worker_id)}") as ear:
            if route in self._held_back:
                # The due records were left behind by a limit or a pause: they are no reason to
                # return at once. Wait for a poke (a finish, a setting, new work), for the time the
                # claim said one may be claimable, or for a record due later.
                held = self._held_back[route]
                due = self._next_due_after(route, worker_id, time.time())
                if held:
                    due = held if due is None else min(due, held)
            else:
                due = self._next_due(route, worker_id)
            # Without a FIFO, the polling back-off; with one, a poke that never
            # comes (a producer that may not open it) costs at most max_idle_poll.
            block = min(timeout, self.max_idle_poll, max(idle, 0.001) if ear is None else timeout)
            if due is not None:
                block = min(block, due - time.time())
            if block <= 0:
                return
            if ear is None:
                time.sleep(block)
            else:
                ear.wait(block)

    def wait_finished(self, job_id: str, timeout: float | None) -> JobRecord | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._wake.listen(self._done_tag(job_id)) as ear:
            if ear is None:
                return super().wait_finished(job_id, timeout)
            while True:
                record = self.get(job_id)
                if record is None or record.finished_state:
                    return record
                block = self.max_idle_poll
                if deadline is not None:
                    block = min(block, deadline - time.monotonic())
                    if block <= 0:
                        return record
                ear.wait(block)

    def close(self) -> None:
        self._wake.close()
        self._db.close()
