"""The backend's tables, made and migrated by the backend itself.

Everything lives in one PostgreSQL schema (``--db``, default ``skunkqueue``),
so the queue's tables never mix with an application's and one database can
hold several independent SkunkQueue installations. The schema's version is
kept in ``schema_version``; :func:`ensure` brings a schema at an earlier
version forward one step at a time, and refuses one made by a newer
skunkqueue-postgres with one line saying so.

Steps are applied under a transaction-scoped advisory lock, so processes
opening a fresh database at once make it once; each step is applied exactly
once, in order, fresh databases included.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import errors, sql

from skunkqueue.errors import BackendUnavailable, ConfigurationError

# Text columns that are compared and sorted use the "C" collation: byte order
# (ids sort by creation time whatever the database's locale) and cheaper comparisons.
STEPS: list[str] = [
    # 1: jobs, the worker registry and settings.
    """
    CREATE TABLE {s}.jobs (
        queue text COLLATE "C" NOT NULL,
        id text COLLATE "C" NOT NULL,
        route text COLLATE "C" NOT NULL,
        target text COLLATE "C",
        state text COLLATE "C" NOT NULL,
        due float8 NOT NULL,
        func text NOT NULL,
        payload bytea NOT NULL,
        serializer text NOT NULL,
        created float8 NOT NULL,
        attempts int4 NOT NULL DEFAULT 0,
        retries int4 NOT NULL DEFAULT 0,
        retry_backoff float8 NOT NULL DEFAULT 1,
        timeout float8,
        token int8 NOT NULL DEFAULT 0,
        owner text,
        lease_until float8,
        kill_requested bool NOT NULL DEFAULT false,
        started float8,
        finished float8,
        result bytea,
        error jsonb,
        dead bool NOT NULL DEFAULT false,
        key text COLLATE "C",
        result_ttl float8,
        expire_at float8,            -- finished + time to live; NULL while pending or running
        PRIMARY KEY (queue, id)
    );
    -- The claim walks this in (due, id) order and stops at the first due row it can lock: only
    -- pending rows are in it, so a backlog of finished or running jobs costs a claim nothing.
    CREATE INDEX jobs_claim ON {s}.jobs (queue, route, due, id) WHERE state = 'pending';
    CREATE INDEX jobs_lease ON {s}.jobs (queue, lease_until) WHERE state = 'running';
    CREATE INDEX jobs_expire ON {s}.jobs (queue, expire_at) WHERE expire_at IS NOT NULL;
    -- One record per (queue, key): the idempotency keys' check-and-insert is this index.
    CREATE UNIQUE INDEX jobs_key ON {s}.jobs (queue, key) WHERE key IS NOT NULL;
    CREATE TABLE {s}.workers (
        queue text COLLATE "C" NOT NULL,
        id text COLLATE "C" NOT NULL,
        route text NOT NULL,
        host text NOT NULL,
        pid int8 NOT NULL,
        state text NOT NULL,
        started float8 NOT NULL,
        last_seen float8 NOT NULL,
        PRIMARY KEY (queue, id)
    );
    CREATE TABLE {s}.settings (
        queue text COLLATE "C" NOT NULL,
        name text COLLATE "C" NOT NULL,
        value text NOT NULL,
        PRIMARY KEY (queue, name)
    );
    """,
    # 2: the monitor's throughput counters, and an index for its per-state counts.
    """
    CREATE TABLE {s}.stats (
        queue text COLLATE "C" NOT NULL,
        minute int8 NOT NULL,
        route text COLLATE "C" NOT NULL,
        name text COLLATE "C" NOT NULL,
        value int8 NOT NULL,
        PRIMARY KEY (queue, minute, route, name)
    );
    CREATE INDEX jobs_state ON {s}.jobs (queue, state, route);
    """,
    # 3: a job's history: one entry per ended attempt (the last 20), and how many were dropped;
    # a worker's async concurrency.
    """
    ALTER TABLE {s}.jobs ADD COLUMN history jsonb NOT NULL DEFAULT '[]',
        ADD COLUMN history_dropped int4 NOT NULL DEFAULT 0;
    ALTER TABLE {s}.workers ADD COLUMN concurrency int4 NOT NULL DEFAULT 1;
    """,
    # 4: flow control (skunkqueue.flow): priorities, limit keys and their rates' times.
    """
    ALTER TABLE {s}.jobs ADD COLUMN priority int4 NOT NULL DEFAULT 0,
        ADD COLUMN limit_key text COLLATE "C", ADD COLUMN limit_concurrency int4,
        ADD COLUMN limit_interval float8, ADD COLUMN limit_burst int4;
    -- The claim seeks one priority at a time (highest first) and walks it in (due, id) order, so
    -- that a priority's jobs due later are never read; pending rows only, as jobs_claim, which
    -- stays for the looks at a route's next due time.
    CREATE INDEX jobs_order ON {s}.jobs (queue, route, priority, due, id) WHERE state = 'pending';
    -- A key's slots: its running rows (those with a live lease count).
    CREATE INDEX jobs_limit ON {s}.jobs (queue, limit_key) WHERE state = 'running' AND limit_key IS NOT NULL;
    CREATE TABLE {s}.flow_times (
        queue text COLLATE "C" NOT NULL,
        name text COLLATE "C" NOT NULL,
        tat float8 NOT NULL,
        PRIMARY KEY (queue, name)
    );
    """,
    # 5: workflows. A record's parents, inputs, on_failure and workflow; who waits for whom (deps);
    # each waiting record's SET of finished parents (settled: a parent counts once however often
    # its finish is replayed); and what a waiting record still needs (waits: the row exists while
    # the record waits, so deleting it is the one release). The columns are nullable without a
    # default: adding them to a full table rewrites nothing.
    """
    ALTER TABLE {s}.jobs ADD COLUMN parents jsonb, ADD COLUMN inputs jsonb, ADD COLUMN on_failure text,
        ADD COLUMN workflow text COLLATE "C";
    CREATE TABLE {s}.deps (
        queue text COLLATE "C" NOT NULL,
        parent text COLLATE "C" NOT NULL,
        child text COLLATE "C" NOT NULL,
        PRIMARY KEY (queue, parent, child)
    );
    CREATE TABLE {s}.settled (
        queue text COLLATE "C" NOT NULL,
        child text COLLATE "C" NOT NULL,
        parent text COLLATE "C" NOT NULL,
        state text NOT NULL,
        PRIMARY KEY (queue, child, parent)
    );
    CREATE TABLE {s}.waits (
        queue text COLLATE "C" NOT NULL,
        child text COLLATE "C" NOT NULL,
        remaining int4 NOT NULL,
        run_anyway bool NOT NULL,
        PRIMARY KEY (queue, child)
    );
    """,
]
VERSION = len(STEPS)

# The first key of the advisory lock taken while migrating (the second is the schema's hash).
LOCK_CLASS = 0x5351  # "SQ"


def _newer(schema: str, found: int) -> ConfigurationError:
    return ConfigurationError(
        f"The PostgreSQL schema {schema!r} is at version {found}, newer than this skunkqueue-postgres "
        f"knows (up to {VERSION}): upgrade skunkqueue-postgres on this host.")


def version_of(conn: psycopg.Connection[Any], schema: str) -> int:
    """The schema's version; 0 when it has no version table (nothing made yet)."""
    try:
        row = conn.execute(sql.SQL("SELECT version FROM {}.schema_version").format(sql.Identifier(schema))).fetchone()
    except (errors.UndefinedTable, errors.InvalidSchemaName):
        return 0
    return 0 if row is None else _first(row)


def _first(row: Any) -> int:
    """The first column of a row, whichever row factory the connection has."""
    return int(next(iter(row.values())) if isinstance(row, dict) else row[0])


def ensure(conn: psycopg.Connection[Any], schema: str, *, upto: int = VERSION) -> int:
    """Make or upgrade the schema to version ``upto`` (tests stop early to make an old one); return
    the version found. ``conn`` is in autocommit mode."""
    found = version_of(conn, schema)
    if found == upto:
        return found
    if found > VERSION:
        raise _newer(schema, found)
    s = sql.Identifier(schema)
    try:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (LOCK_CLASS, schema))
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(s))
            conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {}.schema_version "
                                 "(one bool PRIMARY KEY DEFAULT true CHECK (one), version int4 NOT NULL)").format(s))
            row = conn.execute(sql.SQL("SELECT version FROM {}.schema_version FOR UPDATE").format(s)).fetchone()
            current = 0 if row is None else _first(row)
            if current > VERSION:
                raise _newer(schema, current)
            for step in STEPS[current:upto]:
                conn.execute(sql.SQL(step).format(s=s))  # type: ignore[arg-type]
            if current < upto:
                conn.execute(sql.SQL("INSERT INTO {}.schema_version (version) VALUES (%s) "
                                     "ON CONFLICT (one) DO UPDATE SET version = excluded.version").format(s), (upto,))
    except errors.InsufficientPrivilege as exc:
        raise ConfigurationError(
            f"Cannot create or upgrade the SkunkQueue schema {schema!r}: {str(exc).splitlines()[0]}; "
            f"grant this user CREATE on the database, or have an owner open the queue once.") from None
    except errors.ReadOnlySqlTransaction:
        raise BackendUnavailable(f"Cannot create or upgrade the SkunkQueue schema {schema!r}: "
                                 f"the server is read-only (a standby?).") from None
    return found
