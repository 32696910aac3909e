"""The Redis backend: the Persistence protocol translated to Redis data structures.

The key layout is in :mod:`skunkqueue_redis.keys`, the record encoding in
:mod:`skunkqueue_redis.codec`, addresses and retries in
:mod:`skunkqueue_redis.connection`, and every atomic step is a Lua script in
``scripts/``. Ties between equal due times are broken by the member (the id),
which sorts by creation time, so a zset gives the protocol's (due, id) order
for free.

The store's clock decides: every script reads ``TIME`` for what is due, when a
lease runs out, and the times it stamps (started, lease_until, finished,
last_seen), so workers' clocks need not agree. Times a client computes (a
record's ``due``, a retry's ``due``) are kept as written while the client's
clock is within ``CLOCK_TOLERANCE`` of the store's; beyond that the scripts
move them onto the store's clock, keeping the delay the client meant.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Iterable, Sequence, cast

from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.exceptions import ResponseError

from skunkqueue import flow
from skunkqueue.errors import BackendUnavailable, ConfigurationError, MalformedRecord
from skunkqueue.metrics import RETENTION, RouteMinute
from skunkqueue.persistence import CLOCK_TOLERANCE, LEASE_KILL, LEASE_LOST, LEASE_OK, Persistence, refuse_names_over
from skunkqueue.record import ERROR, HISTORY_LIMIT, PENDING, RUNNING, STATES, JobRecord, Outcome, WorkerInfo
from skunkqueue.summary import QueueSummary, RouteSummary
from skunkqueue.urls import redact
from skunkqueue_redis import scripts
from skunkqueue_redis.aio import NativeAsync
from skunkqueue_redis.codec import decode_record, num, opt, pack_record, text, unpack_fields
from skunkqueue_redis.connection import (
    CLUSTER_SCHEMES,
    DEFAULT_URL,
    SENTINEL_SCHEMES,
    HotLine,
    connect,
    guarded,
    parse_conn_url,
)
from skunkqueue_redis.finishes import MAX_BLOCK
from skunkqueue_redis.keys import Keys, parse_stat_field, stat_field

log = logging.getLogger("skunkqueue.redis")

# Wake-up tokens kept per list: enough to wake every idle worker of a route,
# bounded so a busy route's list cannot grow while nobody is idle.
NOTIFY_CAP = 256
# How long the token that wakes a stopping worker lives (ms): see wake_worker.
WAKE_TOKEN_MS = 10_000
# How long a finished record's wake-up token lives (ms); later waiters read the record itself.
DONE_TOKEN_MS = 60_000
# Claim gives up after this many rounds of stale index entries in one call.
CLAIM_ROUNDS = 8
# Records per enqueue script call.
ENQUEUE_CHUNK = 1000
# Batch size of the non-hot-path scans (counts, list_jobs, purge).
SCAN_BATCH = 1000
# Longest queue or route name, in UTF-8 bytes: far below Redis' 512 MB, since
# every key of the queue repeats its name.
MAX_NAME_BYTES = 1024 * 1024


class _Scripts:
    """The queue's scripts, each called with the arguments every script receives first."""

    def __init__(self, client: Any, keys: Keys) -> None:
        # The arguments every script receives first (see scripts/common.lua).
        head = [*keys.layout(), NOTIFY_CAP, DONE_TOKEN_MS, CLAIM_ROUNDS, CLOCK_TOLERANCE, *keys.tally_layout(),
                *keys.flow_layout()]
        self._head: list[bytes] = [str(item).encode() for item in head]
        self._loaded: dict[str, Script] = {name: client.register_script(scripts.compose(name))
                                           for name in scripts.NEEDS}
        self.line = HotLine(client)

    def __call__(self, name: str, keys: list[str], args: list[Any], client: Any = None) -> Any:
        """Run script ``name``; on ``client`` (a pipeline) if given, else on the hot line."""
        # One argument each: on the hot line hiredis packs them in C, and Redis makes them Lua
        # strings in C, where unpacking one packed argument in Lua cost ~15% of a job's script.
        argv = [*self._head, *map(_arg, args)]
        if client is not None:
            return self._loaded[name](keys=keys, args=argv, client=client)
        return self.line.run(self._loaded[name], keys, argv)

    def after(self, command: tuple[Any, ...], name: str, keys: list[str], args: list[Any]) -> tuple[Any, Any]:
        """``command``'s reply and script ``name``'s, sent together (``HotLine.then``)."""
        return self.line.then(command, self._loaded[name], keys, [*self._head, *map(_arg, args)])


def _arg(value: Any) -> bytes:
    """One script argument as redis-py would send it (str, bytes, int; floats go through num())."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, int):
        return b"%d" % value
    return repr(value).encode()


class RedisPersistence(NativeAsync, Persistence):
    """Redis and Redis Cluster; the key layout is in keys.py, the asyncio methods in aio.py."""

    name = "redis"
    url_schemes = ("redis", "rediss", "unix", *CLUSTER_SCHEMES, *SENTINEL_SCHEMES)
    notifies = True
    claims_on_wake = True
    max_payload = 512 * 1024 * 1024  # Redis' largest string

    def __init__(self, queue: str, *, url: str | None = None, db: str | None = None,
                 connect_timeout: float = 3.0, socket_timeout: float = 15.0, retries: int = 3,
                 max_connections: int | None = None, **options: Any) -> None:
        super().__init__(queue, url=url, db=db, **options)
        self.where = redact(url or DEFAULT_URL)
        if isinstance(max_connections, str) and max_connections.strip().isdigit():  # from a command line
            max_connections = int(max_connections)
        if max_connections is not None and (isinstance(max_connections, bool) or not isinstance(max_connections, int)
                                            or max_connections < 2):
            # Two at least: an event loop's result listener holds one of the asyncio pool's.
            raise ConfigurationError(f"max_connections must be a whole number of 2 or more, not {max_connections!r}.")
        self.connect_args = {"connect_timeout": connect_timeout, "socket_timeout": max(socket_timeout, MAX_BLOCK + 5),
                             "retries": retries, "max_connections": max_connections}
        self.client, self.cluster = connect(url, db, **self.connect_args)
        spec = parse_conn_url(url, db)
        self.wait_replicas, self.wait_timeout_ms = spec.wait_replicas, spec.wait_timeout_ms
        self.keys = Keys(queue)
        self._next_due: dict[str, float] = {}
        self._script = _Scripts(self.client, self.keys)
        # Fail here, with a clear message, rather than at the first job.
        self._ping()

    @guarded
    def _ping(self) -> None:
        self.client.ping()

    @classmethod
    def check_names(cls, queue: str, routes: Sequence[str] = ()) -> None:
        # Keys and fields hold names as UTF-8 (a lone surrogate cannot be sent).
        refuse_names_over(MAX_NAME_BYTES, cls.name, queue, routes)

    @guarded
    def durability_warnings(self) -> list[str]:
        """What CONFIG GET says about persistence on the queue's server (nothing if CONFIG is refused)."""
        client: Any = self.client
        if isinstance(client, RedisCluster):
            client = client.get_node_from_key(self.keys.index).redis_connection
        try:
            config = {text(k): text(v) for k, v in client.config_get("*").items()
                      if text(k) in ("appendonly", "appendfsync", "save")}
        except ResponseError as exc:  # an ACL without +config, or a managed service that renamed it
            log.debug("redis %s: cannot read CONFIG (%s); not checking persistence", self.where, exc)
            return []
        aof, fsync, save = config.get("appendonly", ""), config.get("appendfsync", ""), config.get("save", "")
        if aof == "yes":
            if fsync == "no":
                return [f"Redis at {self.where} writes its append-only file with appendfsync no: the last "
                        "seconds of acknowledged jobs may be lost if the host crashes (use everysec or always)."]
            return []
        if save.strip():
            return [f"Redis at {self.where} keeps only RDB snapshots (save {save!r}, appendonly no): a restart "
                    "loses every job enqueued or finished since the last snapshot. Set appendonly yes."]
        return [f"Redis at {self.where} keeps no durable copy (appendonly no, save ''): a restart loses every "
                "pending job. Set appendonly yes (appendfsync everysec or always)."]

    @guarded
    def now(self) -> float:
        return float(self._script("now", [self.keys.index], []))

    def _pipeline(self, transaction: bool = False) -> Any:
        return self.client.pipeline(transaction=transaction)

    # -- producers -----------------------------------------------------------------

    def enqueue(self, records: Sequence[JobRecord]) -> None:
        self.enqueue_keyed(records)

    @guarded
    def enqueue_keyed(self, records: Sequence[JobRecord]) -> list[str]:
        if not records:
            return []
        k = self.keys
        ttl, now = num(self.result_ttl), num(time.time())
        chunks = self.enqueue_chunks(records)
        if self.wait_replicas:
            pipe = self.client.pipeline(transaction=False)
            self.replicated_enqueue(pipe, chunks, ttl, now)
            return self.holders(records, self.replicas_confirmed(pipe.execute(), len(chunks)))
        if len(chunks) == 1:
            replies = [self._script("enqueue", [k.index, k.lease, k.fired], [ttl, now, chunks[0]])]
        else:
            # MULTI/EXEC keeps a batch of several chunks all-or-nothing. redis-py's
            # cluster pipeline refuses scripts, but every key of the queue lives on
            # one node, so on a cluster the transaction goes to that node directly.
            client = self.client
            if isinstance(client, RedisCluster):
                client = client.get_node_from_key(k.index).redis_connection
            pipe = client.pipeline(transaction=True)
            for chunk in chunks:
                self._script("enqueue", [k.index, k.lease, k.fired], [ttl, now, chunk], client=pipe)
            replies = pipe.execute()
        return self.holders(records, replies)

    def replicated_enqueue(self, pipe: Any, chunks: list[bytes], ttl: Any, now: Any) -> None:
        """Queue on ``pipe`` (one connection, no transaction of redis-py's) the enqueue and a WAIT.

        WAIT counts the replicas that have this connection's writes, so it must follow them on
        the same connection; inside MULTI it would not block, so a transaction of several
        chunks is MULTI…EXEC by hand with the WAIT after it.
        """
        k = self.keys
        if len(chunks) > 1:
            pipe.execute_command("MULTI")
        for chunk in chunks:
            self._script("enqueue", [k.index, k.lease, k.fired], [ttl, now, chunk], client=pipe)
        if len(chunks) > 1:
            pipe.execute_command("EXEC")
        pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)

    def replicas_confirmed(self, replies: list[Any], chunks: int) -> list[Any]:
        """The enqueue replies from :meth:`replicated_enqueue`'s; BackendUnavailable if too few replicas have them."""
        confirmed = int(replies[-1])
        if chunks > 1:
            replies = replies[-2]
            failed = [reply for reply in replies or () if isinstance(reply, Exception)]
            if replies is None or failed:
                raise ResponseError(f"the enqueue transaction failed: {failed[0] if failed else 'aborted'}")
        else:
            replies = replies[:1]
        if confirmed < self.wait_replicas:
            raise BackendUnavailable(
                f"Redis at {self.where} stored the jobs but only {confirmed} of {self.wait_replicas} replica(s) "
                f"confirmed them within {self.wait_timeout_ms} ms: not acknowledged (they may run, or be lost "
                "in a failover). Check the replicas, or raise ?wait_timeout_ms=.")
        return list(replies)

    def enqueue_chunk(self) -> int:
        return ENQUEUE_CHUNK

    def scripts_on(self, client: Any) -> _Scripts:
        return _Scripts(client, self.keys)

    def enqueue_chunks(self, records: Sequence[JobRecord]) -> list[bytes]:
        """The enqueue script's record argument, one per call of at most ENQUEUE_CHUNK records.

        A script is atomic; one call per chunk keeps each one short, so other
        clients are not blocked for long by a huge batch.
        """
        return [b"".join(b"%d:%s" % (len(packed), packed)
                         for packed in map(pack_record, records[start:start + ENQUEUE_CHUNK]))
                for start in range(0, len(records), ENQUEUE_CHUNK)]

    @guarded
    def get(self, job_id: str) -> JobRecord | None:
        try:
            flat = self.client.hgetall(self.keys.job(job_id))
        except ResponseError as exc:  # WRONGTYPE: something else lives under the key
            raise MalformedRecord(f"record {job_id!r} is not a hash: {exc}") from None
        return decode_record(cast("dict[bytes, bytes]", flat), job_id) if flat else None

    @guarded
    def get_many(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        found: list[JobRecord | None] = []
        for start in range(0, len(job_ids), SCAN_BATCH):
            batch = job_ids[start:start + SCAN_BATCH]
            pipe = self._pipeline()
            for job_id in batch:
                pipe.hgetall(self.keys.job(job_id))
            for job_id, flat in zip(batch, pipe.execute(raise_on_error=False)):
                if isinstance(flat, Exception):
                    raise MalformedRecord(f"record {job_id!r} is not a hash: {flat}")
                found.append(decode_record(flat, job_id) if flat else None)
        return found

    # Workflows: scripts/release.lua counts dependents down inside enqueue and finish.
    supports_workflows = True

    @guarded
    def dependents(self, job_id: str) -> list[str]:
        return sorted(text(child) for child in self.client.smembers(self.keys.deps(job_id)))

    def _scan_index(self, fields: Sequence[str]) -> Iterable[tuple[str, list[bytes | None]]]:
        """(id, [field values]) of every live record of the queue, in batches."""
        start = 0
        while True:
            ids = self.client.zrange(self.keys.index, start, start + SCAN_BATCH - 1)
            if not ids:
                return
            start += len(ids)
            pipe = self._pipeline()
            for raw_id in ids:
                pipe.hmget(self.keys.job(text(raw_id)), list(fields))
            for raw_id, values in zip(ids, pipe.execute(raise_on_error=False)):
                if isinstance(values, list) and values[0] is not None:
                    yield text(raw_id), values

    # Ids of the fired index one newest-first page looks at, at most (the monitor's scan budget).
    PAGE_SCAN = 1000

    def _newest_page(self, route: str | None, state: str | None, dead: bool | None, limit: int,
                     after: str | None) -> tuple[list[JobRecord], str | None]:
        # The fired index read backwards from the cursor ("n:<the last id looked at>"): at most
        # PAGE_SCAN ids per call, a page may come back short with a cursor when few records match.
        if after is not None and not after.startswith("n:"):
            raise ValueError(f"{after!r} is not a page cursor of this store")
        self._ensure_fired()
        k = self.keys
        scan = max(limit, self.PAGE_SCAN)
        top = f"({after[2:]}" if after else "+"
        records: list[JobRecord] = []
        looked, cursor = 0, None
        while looked < scan and len(records) < limit:
            # As many as are still missing (at least 100: a filter may skip many), not a whole batch
            # read in full for a page of 50.
            want = min(SCAN_BATCH, scan - looked, max(limit - len(records), 100))
            ids = [text(i) for i in self.client.zrevrangebylex(k.fired, top, "-", start=0, num=want)]
            if not ids:
                return records, None
            pipe = self._pipeline()
            for job_id in ids:
                pipe.hgetall(k.job(job_id))
            gone = []
            for job_id, flat in zip(ids, pipe.execute(raise_on_error=False)):
                looked += 1
                cursor = f"n:{job_id}"
                if isinstance(flat, dict) and not flat:
                    gone.append(job_id)  # expired or deleted since it was indexed
                    continue
                try:
                    record = decode_record(flat, job_id) if isinstance(flat, dict) else None
                except MalformedRecord:
                    record = None
                if record is not None and (route is None or record.route == route) and \
                        (state is None or record.state == state) and (dead is None or record.dead == dead):
                    records.append(record)
                    if len(records) == limit:
                        break
            if gone:
                self.client.zrem(k.fired, *gone)
            top = f"({ids[-1]}" if cursor is None else f"({cursor[2:]}"
        return records, cursor

    def _ensure_fired(self) -> None:
        """Index, once, the records stored before the fired index existed (enqueue.lua keeps it since)."""
        k = self.keys
        if self.client.exists(k.fired_indexed):
            return
        start = 0
        while True:
            ids = self.client.zrange(k.index, start, start + SCAN_BATCH - 1)
            if not ids:
                break
            start += len(ids)
            self.client.zadd(k.fired, {text(i): 0 for i in ids})
        self.client.set(k.fired_indexed, "1")

    def _ensure_tallied(self) -> None:
        """Build the monitor's index once for records stored before it existed (see scripts/reindex.lua)."""
        k = self.keys
        if self.client.exists(k.tallied):
            return
        start = 0
        while True:
            examined = int(self._script("reindex", [k.index], [start, SCAN_BATCH]))
            start += examined
            if examined < SCAN_BATCH:
                break
        self.client.set(k.tallied, "1")

    @guarded
    def summary(self, now: float | None = None) -> QueueSummary:
        # From the per-route index the scripts keep (scripts/common.lua tally()): no record is read.
        self._ensure_tallied()
        rows, _ = self._script("summary", [self.keys.routes], [])
        routes = []
        for route, *numbers, oldest in rows:
            states = dict(zip(STATES, (int(n) for n in numbers[:len(STATES)])))
            dead = int(numbers[len(STATES)])
            if not any(states.values()) and not dead:
                continue  # every record of the route is gone
            routes.append(RouteSummary(text(route), states, dead, float(oldest) if oldest else None))
        routes.sort(key=lambda r: r.route)
        return QueueSummary(routes)

    def _tallied_ids(self, route: str | None, state: str | None, dead: bool | None,
                     limit: int) -> list[str] | None:
        """Candidate ids from the monitor's index when the filters allow it (None: scan everything)."""
        if dead:
            state = ERROR if state in (None, ERROR) else state
        if state is None or (dead and state != ERROR):
            return None
        self._ensure_tallied()
        name = "dead" if dead else state
        routes = [route] if route is not None else sorted(text(r) for r in self.client.smembers(self.keys.routes))
        pipe = self._pipeline()
        for r in routes:
            if state == PENDING:
                # Scored by due, ties by id: the protocol's order, so the first `limit` are all it needs.
                pipe.zrange(self.keys.tally(r, name), 0, limit - 1)
            elif state == RUNNING:
                pipe.zrange(self.keys.tally(r, name), 0, -1)
            else:
                # Finished entries count while their record lives (the score is when it expires).
                pipe.zrangebyscore(self.keys.tally(r, name), f"({num(time.time())}", "+inf")
        return [text(i) for ids in pipe.execute() for i in ids]

    def _fields_of(self, ids: Sequence[str], fields: Sequence[str]) -> Iterable[tuple[str, list[bytes | None]]]:
        for start in range(0, len(ids), SCAN_BATCH):
            batch = ids[start:start + SCAN_BATCH]
            pipe = self._pipeline()
            for job_id in batch:
                pipe.hmget(self.keys.job(job_id), list(fields))
            for job_id, values in zip(batch, pipe.execute(raise_on_error=False)):
                if isinstance(values, list) and values[0] is not None:
                    yield job_id, values

    @guarded
    def list_jobs(self, *, route: str | None = None, state: str | None = None,
                  dead: bool | None = None, limit: int = 1000) -> list[JobRecord]:
        wanted: list[tuple[float, str]] = []
        ids = self._tallied_ids(route, state, dead, limit)
        found = (self._scan_index(("route", "state", "dead", "due")) if ids is None
                 else self._fields_of(ids, ("route", "state", "dead", "due")))
        for job_id, (r, s, d, due) in found:
            if route is not None and r != route.encode():
                continue
            if state is not None and s != state.encode():
                continue
            if dead is not None and (d == b"1") != dead:
                continue
            try:
                wanted.append((float(due or 0), job_id))
            except ValueError:
                continue
        wanted.sort()
        records: list[JobRecord] = []
        for start in range(0, len(wanted), SCAN_BATCH):
            batch = wanted[start:start + SCAN_BATCH]
            pipe = self._pipeline()
            for _, job_id in batch:
                pipe.hgetall(self.keys.job(job_id))
            for (_, job_id), flat in zip(batch, pipe.execute(raise_on_error=False)):
                if not isinstance(flat, dict) or not flat:
                    continue
                try:
                    records.append(decode_record(flat, job_id))
                except MalformedRecord:
                    continue
                if len(records) >= limit:
                    return records
        return records

    pages_newest_first = True

    @guarded
    def list_page(self, *, route: str | None = None, state: str | None = None, dead: bool | None = None,
                  limit: int = 100, after: str | None = None,
                  newest: bool = False) -> tuple[list[JobRecord], str | None]:
        if newest:
            return self._newest_page(route, state, dead, limit, after)
        # Walks the monitor's index zsets one after another (per route, per state), each in its own
        # order (pending by due, running by id, finished by expiry): O(page), not O(queue).
        # The cursor is "<which zset>:<rank in it>".
        self._ensure_tallied()
        zset, rank = 0, 0
        if after:
            first, _, second = after.partition(":")
            if not (first.isdigit() and second.isdigit()):
                raise ValueError(f"{after!r} is not a page cursor of this store")
            zset, rank = int(first), int(second)
        if dead:
            names = ["dead"] if state in (None, ERROR) else []
        else:
            names = [state] if state is not None else list(STATES)
        routes = [route] if route is not None else sorted(text(r) for r in self.client.smembers(self.keys.routes))
        sources = [(r, n) for r in routes for n in names]
        records: list[JobRecord] = []
        now = num(time.time())
        while zset < len(sources) and len(records) < limit:
            r, name = sources[zset]
            want = limit - len(records)
            key = self.keys.tally(r, name)
            if name in (PENDING, RUNNING):
                ids = self.client.zrange(key, rank, rank + want - 1)
            else:  # finished entries count while their record lives (the score is when it expires)
                ids = self.client.zrangebyscore(key, f"({now}", "+inf", start=rank, num=want)
            rank += len(ids)
            pipe = self._pipeline()
            for raw_id in ids:
                pipe.hgetall(self.keys.job(text(raw_id)))
            for raw_id, flat in zip(ids, pipe.execute(raise_on_error=False)):
                if not isinstance(flat, dict) or not flat:
                    continue
                try:
                    record = decode_record(flat, text(raw_id))
                except MalformedRecord:
                    continue
                if record.route != r or (name != "dead" and record.state != name):
                    continue  # moved on since the zset was read
                if dead is not None and record.dead != dead:
                    continue
                records.append(record)
            if len(ids) < want:
                zset, rank = zset + 1, 0
        return records, (f"{zset}:{rank}" if zset < len(sources) else None)

    @guarded
    def counts(self) -> dict[tuple[str, str], int]:
        # From the monitor's index, as summary(): a few commands per route, not a read of every record.
        return {(r.route, state): n for r in self.summary().routes for state, n in r.states.items() if n}

    @guarded
    def purge(self, route: str, *, target: str | None = None) -> int:
        k = self.keys

        def of(target: str | None) -> list[str]:  # the due zsets of the shared records or one target's
            levels = sorted(int(text(p)) for p in self.client.zrange(k.levels(route, target), 0, -1))
            return [k.due(route, target)] + [k.level_due(route, p, target) for p in levels]

        if target is not None:
            zsets = of(target)
        else:
            names = sorted(text(t) for t in self.client.smembers(k.targets(route)))
            zsets = of(None) + [zset for name in names for zset in of(name)]
        deleted = 0
        for zkey in zsets:
            while True:
                n, examined = self._script("purge", [zkey, k.index, k.fired], [SCAN_BATCH])
                deleted += int(n)
                if int(examined) < SCAN_BATCH:
                    break
        return deleted

    @guarded
    def delete_finished(self, job_ids: Sequence[str]) -> int:
        deleted = 0
        for start in range(0, len(job_ids), SCAN_BATCH):
            batch = list(job_ids[start:start + SCAN_BATCH])
            deleted += int(self._script("delete", [self.keys.index, self.keys.fired], batch))
        return deleted

    @guarded
    def request_kill(self, job_id: str) -> bool:
        return bool(self._script("kill", [self.keys.job(job_id)], []))

    # -- workers -----------------------------------------------------------------

    @guarded
    def claim(self, route: str, worker_id: str, lease: float, limit: int = 1) -> list[JobRecord]:
        keys, args = self._claim_call(route, worker_id, lease, limit)
        return self._claimed(route, self._script("claim", keys, args))

    def _claim_call(self, route: str, worker_id: str, lease: float, limit: int) -> tuple[list[str], list[Any]]:
        k = self.keys
        keys = [k.due(route), k.due(route, worker_id), k.notify(route), k.notify(route, worker_id)]
        return keys, [num(lease), worker_id, int(limit), num(self.result_ttl), route, flow.FLOW_SCAN]

    def _claimed(self, route: str, reply: Any) -> list[JobRecord]:
        """Decode claim's reply; quarantine what does not decode."""
        hashes, next_due, foreign, now = reply
        # When the next record falls due, as a local monotonic time: the store's
        # clock and ours need not agree, but both count seconds alike.
        self._next_due[route] = (time.monotonic() + float(next_due) - float(now)) if next_due else math.inf
        for key in foreign:
            log.warning("queue %s route %s: skipped %s, which is not a SkunkQueue record",
                        self.queue, route, key.decode(errors="replace"))
        claimed = []
        for item in hashes:
            # A flat list of names and values (HGETALL's); scripts before it packed them in one string.
            fields = unpack_fields(item) if isinstance(item, bytes) else dict(zip(item[::2], item[1::2]))
            job_id = fields.get(b"id", b"?").decode(errors="replace")
            try:
                claimed.append(decode_record(fields, job_id))
            except MalformedRecord as exc:
                log.error("queue %s: quarantined record %s: %s", self.queue, job_id, exc)
                self._quarantine(job_id, str(exc))
        return claimed

    def _quarantine(self, job_id: str, why: str) -> None:
        k = self.keys
        self._script("quarantine", [k.job(job_id), k.lease, k.index], [job_id, why, num(self.result_ttl)])

    @guarded
    def renew(self, worker_id: str, leases: Sequence[tuple[str, int]], lease: float) -> dict[str, str]:
        if not leases:
            return {}
        args: list[Any] = [num(lease)]
        for job_id, token in leases:
            args += [job_id, int(token)]
        statuses = self._script("renew", [self.keys.lease], args)
        names = {b"ok": LEASE_OK, b"kill": LEASE_KILL, b"lost": LEASE_LOST}
        return {job_id: names[s] for (job_id, _), s in zip(leases, statuses)}

    @guarded
    def finish(self, job_id: str, token: int, outcome: Outcome, *, expect: str = RUNNING) -> bool:
        keys, args = self._finish_call(job_id, token, outcome, expect)
        return bool(self._script("finish", keys, args))

    @guarded
    def finish_and_claim(self, job_id: str, token: int, outcome: Outcome, route: str, worker_id: str,
                         lease: float, limit: int = 1) -> tuple[bool, list[JobRecord]]:
        finish_keys, finish_args = self._finish_call(job_id, token, outcome, RUNNING)
        claim_keys, claim_args = self._claim_call(route, worker_id, lease, limit)
        applied, reply = self._script("finish_and_claim", finish_keys + claim_keys,
                                      [len(finish_args), *finish_args, *claim_args])
        return bool(applied), self._claimed(route, reply)

    def _finish_call(self, job_id: str, token: int, outcome: Outcome,
                     expect: str) -> tuple[list[str], list[Any]]:
        k = self.keys
        error = json.dumps(outcome.error) if outcome.error is not None else None
        attempts = str(outcome.attempts) if outcome.attempts is not None else None
        due = opt(num(outcome.due) if outcome.due is not None else None)
        if outcome.due_from_store and outcome.due is not None:
            due = b"=" + due[1:]  # on the store's clock already: finish.lua keeps it as it is
        finished = num(outcome.finished) if outcome.finished is not None else None
        entry = json.dumps(outcome.attempt) if outcome.attempt else None
        return [k.job(job_id), k.lease, k.index], [
            job_id, int(token), expect, num(time.time()), num(self.result_ttl), outcome.state,
            "1" if outcome.dead else "0", opt(attempts), opt(error), opt(outcome.result), due, opt(finished),
            opt(entry), HISTORY_LIMIT]

    @guarded
    def expired_leases(self, now: float, limit: int = 100) -> list[JobRecord]:
        # ``now`` is the caller's clock; the store's decides when a lease ran out.
        k = self.keys
        ids, _ = self._script("expired", [k.lease, k.index, k.fired], [int(limit)])
        if not ids:
            return []
        pipe = self._pipeline()
        for raw_id in ids:
            pipe.hgetall(k.job(raw_id.decode()))
        records = []
        for raw_id, flat in zip(ids, pipe.execute(raise_on_error=False)):
            job_id = raw_id.decode()
            if not isinstance(flat, dict) or not flat:
                self.client.zrem(k.lease, raw_id)  # the record is gone: nothing to recover
                continue
            try:
                record = decode_record(flat, job_id)
            except MalformedRecord as exc:
                self._quarantine(job_id, str(exc))
                continue
            if record.state == RUNNING:
                records.append(record)
            else:
                self.client.zrem(k.lease, raw_id)
        return records

    @guarded
    def register_worker(self, info: WorkerInfo) -> None:
        fields: list[str] = []
        for name, value in info.to_dict().items():
            fields += [name, num(value) if isinstance(value, float) else str(value)]
        self._script("register", [self.keys.worker(info.id), self.keys.workers],
                     [info.id, num(time.time()), *fields])

    @guarded
    def heartbeat(self, worker_id: str, state: str) -> bool:
        return bool(self._script("heartbeat", [self.keys.worker(worker_id)], [state]))

    @guarded
    def unregister_worker(self, worker_id: str) -> None:
        pipe = self._pipeline(transaction=True)
        pipe.delete(self.keys.worker(worker_id))
        pipe.srem(self.keys.workers, worker_id)
        pipe.execute()

    @guarded
    def workers(self) -> list[WorkerInfo]:
        ids = sorted(text(raw) for raw in self.client.smembers(self.keys.workers))
        if not ids:
            return []
        pipe = self._pipeline()
        for worker_id in ids:
            pipe.hgetall(self.keys.worker(worker_id))
        found = []
        for worker_id, flat in zip(ids, pipe.execute()):
            if not flat:
                self.client.srem(self.keys.workers, worker_id)
                continue
            data = {key.decode(): value.decode() for key, value in flat.items()}
            try:
                data["pid"] = int(data["pid"])
                data["started"] = float(data["started"])
                data["last_seen"] = float(data["last_seen"])
                found.append(WorkerInfo.from_dict(data))
            except (KeyError, ValueError, TypeError):
                log.warning("queue %s: ignoring unreadable worker entry %s", self.queue, worker_id)
        return found

    # -- settings ------------------------------------------------------------------

    @guarded
    def get_setting(self, name: str) -> str | None:
        value = self.client.hget(self.keys.settings, name)
        return None if value is None else text(value)

    @guarded
    def put_setting(self, name: str, value: str | None) -> None:
        if value is None:
            self.client.hdel(self.keys.settings, name)
        else:
            self.client.hset(self.keys.settings, name, value)
        route = flow.route_of_setting(name)
        if route is not None:
            # A resume or a changed limit: the route's idle workers, waiting on what a claim told
            # them, look again now (one token each, as many as the wake-up list holds).
            notify = self.keys.notify(route)
            pipe = self._pipeline()
            pipe.rpush(notify, *(["1"] * NOTIFY_CAP))
            pipe.ltrim(notify, -NOTIFY_CAP, -1)
            pipe.execute()

    # -- flow control (the claim script enforces it; see scripts/claim.lua) ---------

    supports_priorities = True
    supports_limits = True
    supports_pause = True

    @guarded
    def rate_times(self, names: Sequence[str]) -> dict[str, float]:
        if not names:
            return {}
        now = self.now()
        found: dict[str, float] = {}
        for name, value in zip(names, self.client.mget([self.keys.rate(n) for n in names])):
            if value is not None and float(value) > now:
                found[name] = float(value)
        return found

    # -- throughput counters -----------------------------------------------------------

    @guarded
    def add_stats(self, samples: Sequence[RouteMinute]) -> None:
        # Each HINCRBY is atomic, which is all pools adding at once need; the
        # pipeline only saves round trips (on a cluster every key is in one slot).
        oldest = int((time.time() - RETENTION) // 60)
        pipe = self._pipeline()
        for sample in samples:
            if sample.minute < oldest or not sample.counts:
                continue
            minute_key = self.keys.minute(sample.minute)
            for counter, value in sample.counts.items():
                pipe.hincrby(minute_key, stat_field(counter, sample.route), int(value))
            pipe.expireat(minute_key, sample.minute * 60 + RETENTION + 60)
            pipe.zadd(self.keys.stats, {str(sample.minute): sample.minute})
        if len(pipe):
            pipe.zremrangebyscore(self.keys.stats, "-inf", f"({oldest}")
            pipe.execute()

    @guarded
    def stats(self, since_minute: int) -> list[RouteMinute]:
        minutes = [int(text(m)) for m in self.client.zrangebyscore(self.keys.stats, since_minute, "+inf")]
        if not minutes:
            return []
        pipe = self._pipeline()
        for minute in minutes:
            pipe.hgetall(self.keys.minute(minute))
        found: dict[tuple[str, int], RouteMinute] = {}
        for minute, fields in zip(minutes, pipe.execute()):
            for field, value in fields.items():
                counter, route = parse_stat_field(text(field))
                entry = found.setdefault((route, minute), RouteMinute(route, minute))
                entry.counts[counter] = int(value)
        return list(found.values())

    # -- waiting -------------------------------------------------------------------

    @guarded
    def wait_for_work(self, route: str, worker_id: str, timeout: float, idle: float = 0.0) -> None:
        # The last claim told us when the next known record becomes due: wake then at the latest.
        timeout = min(timeout, self._next_due.get(route, math.inf) - time.monotonic(), MAX_BLOCK)
        if timeout < 0.001:
            return
        self.client.blpop([self.keys.notify(route), self.keys.notify(route, worker_id)], timeout=timeout)

    @guarded
    def wake_worker(self, route: str, worker_id: str) -> None:
        # A token on the list only this worker blocks on; it lives a few seconds at most, so a
        # worker that stopped without waiting again leaves nothing behind.
        pipe = self._pipeline()
        key = self.keys.notify(route, worker_id)
        pipe.rpush(key, "1")
        pipe.pexpire(key, WAKE_TOKEN_MS)
        pipe.execute()

    @guarded
    def wait_and_claim(self, route: str, worker_id: str, timeout: float, idle: float, lease: float,
                       limit: int = 1) -> list[JobRecord]:
        # BLPOP, then the claim script in the same write: Redis runs the claim as soon as the
        # BLPOP returns (woken or timed out), and both replies come back in one round trip.
        timeout = min(timeout, self._next_due.get(route, math.inf) - time.monotonic(), MAX_BLOCK)
        keys, args = self._claim_call(route, worker_id, lease, limit)
        if timeout < 0.001:
            return self._claimed(route, self._script("claim", keys, args))
        blpop = ("BLPOP", self.keys.notify(route), self.keys.notify(route, worker_id), timeout)
        return self._claimed(route, self._script.after(blpop, "claim", keys, args)[1])

    @guarded
    def _wait_then_get(self, job_id: str, left: float | None, rounds: int, last: JobRecord) -> JobRecord | None:
        # The BLMOVE on the done list, then the HGETALL in the same write: the record is read
        # the moment the finish's token arrives, without a round trip of its own.
        done, _, block, whence, where = self.done_wait(job_id, left)
        blmove = ("BLMOVE", done, done, whence, where, block)
        try:
            _, flat = self._script.line.then(blmove, ("HGETALL", self.keys.job(job_id)))
        except ResponseError as exc:  # WRONGTYPE: something else lives under the key
            raise MalformedRecord(f"record {job_id!r} is not a hash: {exc}") from None
        if isinstance(flat, list):  # RESP2's flat list, without redis-py's response callback
            flat = dict(zip(flat[::2], flat[1::2]))
        return decode_record(cast("dict[bytes, bytes]", flat), job_id) if flat else None

    @guarded
    def _wait_for_finish(self, job_id: str, left: float | None, rounds: int) -> None:
        # finish pushes a token onto the job's done list: block on it instead of polling.
        # Redis takes a fractional timeout; redis-py's stub says int.
        self.client.blmove(*self.done_wait(job_id, left))  # type: ignore[arg-type]

    def done_wait(self, job_id: str, left: float | None) -> tuple[str, str, float, str, str]:
        """BLMOVE's arguments for a wait on ``job_id``'s done list: onto the same list, which
        leaves the token for every other waiter, for at most ``left`` (and MAX_BLOCK) seconds."""
        done = self.keys.done(job_id)
        block = MAX_BLOCK if left is None else min(MAX_BLOCK, left)
        return done, done, max(block, 0.01), "RIGHT", "LEFT"

    def close(self) -> None:
        self.close_async_clients()
        self._script.line.close()
        self.client.close()

