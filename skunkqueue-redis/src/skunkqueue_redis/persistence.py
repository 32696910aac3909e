"""The Redis backend: the Persistence protocol translated to Redis data structures.

Keys of queue Q (``{Q}`` is a Redis Cluster hash tag, so every key of a queue
lives in one slot and every multi-key script works on a cluster)::

    sq:{Q}:j:<id>              hash    one JobRecord; None fields are absent
    sq:{Q}:d:<route>           zset    pending records anyone may claim, score = due
    sq:{Q}:d:<route>:<target>  zset    pending broadcast records for one worker
    sq:{Q}:t:<route>           set     targets that ever had a broadcast on the route (for purge)
    sq:{Q}:n:<route>[:<tgt>]   list    wake-up tokens idle workers block on (BLPOP)
    sq:{Q}:lease               zset    running records, score = lease_until
    sq:{Q}:jobs                zset    every record, score = +inf or when it expires (counts, list_jobs)
    sq:{Q}:done:<id>           list    one token while a record is finished; waiters BLMOVE on it
    sq:{Q}:workers, sq:{Q}:w:<id>      worker registry (set of ids, one hash per worker)

Route and target names are %-escaped (``%`` and ``:``) so they cannot run into
each other. Atomic steps are Lua scripts; ties between equal due times are
broken by the member (the id), which sorts by creation time, so a zset gives the
protocol's (due, id) order for free. Times come from the caller's clock, like
every other backend, so that ``due`` set by a producer and ``now`` of a worker
are compared on the same scale.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, TypeVar, cast
from urllib.parse import unquote

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import SSLConnection, parse_url
from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    RedisClusterException,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from skunkqueue.errors import BackendUnavailable, ConfigurationError, MalformedRecord
from skunkqueue.persistence import LEASE_KILL, LEASE_LOST, LEASE_OK, Persistence
from skunkqueue.record import RUNNING, JobRecord, Outcome, WorkerInfo
from skunkqueue.urls import redact

log = logging.getLogger("skunkqueue.redis")

DEFAULT_URL = "localhost:6379"
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

# Wake-up tokens kept per list: enough to wake every idle worker of a route,
# bounded so a busy route's list cannot grow while nobody is idle.
NOTIFY_CAP = 256
# How long a finished record's wake-up token lives (ms); later waiters read the record itself.
DONE_TOKEN_MS = 60_000
# Longest single server-side block; a longer wait is several blocks, so the
# socket timeout never fires on a healthy connection.
MAX_BLOCK = 5.0
# Claim gives up after this many rounds of stale index entries in one call.
CLAIM_ROUNDS = 8
# Records per enqueue script call.
ENQUEUE_CHUNK = 1000
# Batch size of the non-hot-path scans (counts, list_jobs, purge).
SCAN_BATCH = 1000

# -- record <-> hash ---------------------------------------------------------------

_STR = ("id", "queue", "route", "func", "serializer", "state", "target", "owner")
_BYTES = ("payload", "result")
_FLOAT = ("due", "created", "retry_backoff", "timeout", "lease_until", "started", "finished")
_INT = ("attempts", "retries", "token")
_BOOL = ("kill_requested", "dead")


def _decode_value(name: str, raw: bytes) -> Any:
    if name in _BYTES:
        return raw
    text = raw.decode()
    if name in _FLOAT:
        return float(text)
    if name in _INT:
        return int(text)
    if name in _BOOL:
        return text == "1"
    if name == "error":
        return json.loads(text)
    return text


_DECODERS: dict[bytes, str] = {
    name.encode(): name for name in (*_STR, *_BYTES, *_FLOAT, *_INT, *_BOOL, "error")
}


def _text(raw: Any) -> str:
    """A key or member as text (the client returns bytes: decode_responses is off)."""
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def decode_record(flat: dict[bytes, bytes] | Sequence[bytes], job_id: str = "?") -> JobRecord:
    """A record from HGETALL's answer (a dict, or the flat list a script returns)."""
    pairs: Iterable[tuple[bytes, bytes]]
    if isinstance(flat, dict):
        pairs = flat.items()
    else:
        pairs = zip(flat[::2], flat[1::2])
    data: dict[str, Any] = {}
    try:
        for key, raw in pairs:
            name = _DECODERS.get(key)
            if name is not None:
                data[name] = _decode_value(name, raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedRecord(f"record {job_id!r} has an unreadable field: {exc}") from None
    if data.get("error") is not None and not isinstance(data["error"], dict):
        raise MalformedRecord(f"record {job_id!r}: error is not an object")
    return JobRecord.from_dict(data)


# Fields left out while they hold their zero value: a fresh record is then ten
# fields, and the scripts read a missing token or attempts as 0.
_OMIT_ZERO = {"token": 0, "attempts": 0, "retries": 0, "kill_requested": False, "dead": False}


def encode_record(record: JobRecord) -> dict[str, bytes]:
    """The record as hash fields; None (and a zero counter) is the absence of the field."""
    out: dict[str, bytes] = {}
    for name, value in vars(record).items():
        if value is None or (name in _OMIT_ZERO and value == _OMIT_ZERO[name]):
            continue
        if name in _BYTES:
            out[name] = bytes(value)
        elif name in _FLOAT:
            out[name] = repr(float(value)).encode()  # repr round-trips a float exactly
        elif name in _BOOL:
            out[name] = b"1" if value else b"0"
        elif name == "error":
            out[name] = json.dumps(value).encode()
        else:
            out[name] = str(value).encode()
    return out


# Records travel to and from the scripts as one string of "<length>:<bytes>"
# items: redis-py packs and parses each protocol element in Python, so one
# string per record (or per batch) costs a fraction of one element per field.

def pack_items(items: Iterable[bytes]) -> bytes:
    return b"".join(b"%d:%s" % (len(item), item) for item in items)


_NAME_ITEMS = {name: b"%d:%s" % (len(name), name.encode()) for name in _DECODERS.values()}


def pack_record(record: JobRecord) -> bytes:
    """encode_record, packed as name/value items; on the enqueue hot path, hence unrolled."""
    return b"".join(_NAME_ITEMS[name] + b"%d:%s" % (len(value), value)
                    for name, value in encode_record(record).items())


def unpack_fields(blob: bytes) -> dict[bytes, bytes]:
    """Name/value pairs packed by pack_items (or by the scripts' pack())."""
    out: dict[bytes, bytes] = {}
    pos, end, find = 0, len(blob), blob.find
    while pos < end:
        colon = find(b":", pos)
        stop = colon + 1 + int(blob[pos:colon])
        name = blob[colon + 1:stop]
        colon = find(b":", stop)
        pos = colon + 1 + int(blob[stop:colon])
        out[name] = blob[colon + 1:pos]
    return out


def _num(value: float) -> str:
    return repr(float(value))


def _opt(value: bytes | str | None) -> bytes:
    """An optional script argument: empty means None, else a '.' then the value."""
    if value is None:
        return b""
    return b"." + (value.encode() if isinstance(value, str) else value)


def escape(name: str) -> str:
    return name.replace("%", "%25").replace(":", "%3A")


# -- Lua -------------------------------------------------------------------------
# Shared helpers, prepended to the scripts that need them. ``base`` is the
# queue's key prefix "sq:{Q}:"; key names built here must match _Keys below.

_LUA_HELPERS = r"""
local function esc(s) return (string.gsub(s, '[%%:]', function(c) return c == '%' and '%25' or '%3A' end)) end
local function due_key(base, route, target)
  if target then return base .. 'd:' .. esc(route) .. ':' .. esc(target) end
  return base .. 'd:' .. esc(route)
end
local function notify_key(base, route, target)
  if target then return base .. 'n:' .. esc(route) .. ':' .. esc(target) end
  return base .. 'n:' .. esc(route)
end
local function take(s, pos)
  local colon = string.find(s, ':', pos, true)
  local stop = colon + tonumber(string.sub(s, pos, colon - 1))
  return string.sub(s, colon + 1, stop), stop + 1
end
local function pack(flat)
  local parts = {}
  for i, v in ipairs(flat) do parts[i] = #v .. ':' .. v end
  return table.concat(parts)
end
local function quarantine(base, id, why, now, ttl_ms, expire_at)
  local key = base .. 'j:' .. id
  redis.call('HSET', key, 'state', 'error', 'dead', '1', 'finished', now,
    'error', cjson.encode({type = 'MalformedRecord', message = why, traceback = ''}))
  redis.call('HDEL', key, 'owner', 'lease_until')
  redis.call('ZREM', base .. 'lease', id)
  redis.call('PEXPIRE', key, ttl_ms)
  redis.call('ZADD', base .. 'jobs', expire_at, id)
end
"""

# KEYS: route zset, (route, worker) zset, lease zset, route notify, (route, worker) notify
# ARGV: base, now, lease_until, worker, limit, ttl_ms, expire_at
# Returns {claimed records (packed), next due score or '', foreign keys skipped}.
_CLAIM = _LUA_HELPERS + r"""
local base, now, until_, worker = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local limit, ttl_ms, expire_at = tonumber(ARGV[5]), ARGV[6], ARGV[7]
local nownum = tonumber(now)
local out, foreign = {}, {}
for _ = 1, """ + str(CLAIM_ROUNDS) + r""" do
  local want = limit - #out
  if want <= 0 then break end
  local a = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, want)
  local b = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'WITHSCORES', 'LIMIT', 0, want)
  if #a == 0 and #b == 0 then break end
  -- Merge the shared and the broadcast zset in (due, id) order.
  local i, j, picked = 1, 1, {}
  while #picked < want and (i <= #a or j <= #b) do
    local from_a
    if i > #a then from_a = false
    elseif j > #b then from_a = true
    else
      local sa, sb = tonumber(a[i + 1]), tonumber(b[j + 1])
      from_a = sa < sb or (sa == sb and a[i] < b[j])
    end
    if from_a then picked[#picked + 1] = {a[i], KEYS[1]}; i = i + 2
    else picked[#picked + 1] = {b[j], KEYS[2]}; j = j + 2 end
  end
  for _, p in ipairs(picked) do
    local id, zkey = p[1], p[2]
    local key = base .. 'j:' .. id
    redis.call('ZREM', zkey, id)
    local kind = redis.call('TYPE', key)['ok']
    if kind == 'hash' then
      local f = redis.call('HMGET', key, 'state', 'token', 'attempts')
      local token, attempts = tonumber(f[2] or '0'), tonumber(f[3] or '0')
      if f[1] == 'pending' and token and attempts then
        redis.call('HSET', key, 'state', 'running', 'owner', worker, 'lease_until', until_,
          'token', token + 1, 'attempts', attempts + 1, 'started', now, 'kill_requested', '0')
        redis.call('ZADD', KEYS[3], until_, id)
        out[#out + 1] = pack(redis.call('HGETALL', key))
      elseif f[1] == 'pending' then
        quarantine(base, id, 'token or attempts is not a number', now, ttl_ms, expire_at)
      elseif f[1] ~= 'running' and f[1] ~= 'complete' and f[1] ~= 'error' and f[1] ~= 'killed' then
        quarantine(base, id, 'unknown state ' .. tostring(f[1]), now, ttl_ms, expire_at)
      end
      -- a known non-pending state is a stale index entry: dropping it was all there was to do
    elseif kind ~= 'none' then
      foreign[#foreign + 1] = key
    end
  end
end
local next_due = ''
local n1 = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local n2 = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if n1[2] then next_due = n1[2] end
if n2[2] and (next_due == '' or tonumber(n2[2]) < tonumber(next_due)) then next_due = n2[2] end
if next_due == '' or tonumber(next_due) > nownum then
  -- Nothing is claimable now, so any wake-up tokens left are stale.
  redis.call('DEL', KEYS[4], KEYS[5])
end
return {out, next_due, foreign}
"""

# KEYS: lease zset, index zset; ARGV: base, ttl_ms, now, records (each packed, then packed together)
_ENQUEUE = _LUA_HELPERS + r"""
local base, ttl_ms, now, blob = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local wake, seen, pos = {}, {}, 1
while pos <= #blob do
  local rec, fields, f, p = nil, {}, {}, 1
  rec, pos = take(blob, pos)
  while p <= #rec do
    local name, value
    name, p = take(rec, p)
    value, p = take(rec, p)
    f[name] = value
    fields[#fields + 1] = name
    fields[#fields + 1] = value
  end
  local id = f['id']
  local key = base .. 'j:' .. id
  redis.call('HSET', key, unpack(fields))
  if f['state'] == 'pending' then
    -- A batch usually has one route: build its key names once.
    local where = f['route'] .. '\0' .. (f['target'] or '')
    local names = seen[where]
    if not names then
      names = {due_key(base, f['route'], f['target']), notify_key(base, f['route'], f['target'])}
      seen[where] = names
    end
    redis.call('ZADD', names[1], f['due'], id)
    redis.call('ZADD', KEYS[2], '+inf', id)
    local nkey = names[2]
    wake[nkey] = (wake[nkey] or 0) + 1
    if f['target'] then redis.call('SADD', base .. 't:' .. esc(f['route']), f['target']) end
  elseif f['state'] == 'running' then
    redis.call('ZADD', KEYS[1], f['lease_until'] or '0', id)
    redis.call('ZADD', KEYS[2], '+inf', id)
  else
    redis.call('PEXPIRE', key, ttl_ms)
    redis.call('ZADD', KEYS[2], (tonumber(f['finished'] or '') or now) + ttl_ms / 1000, id)
  end
end
for nkey, n in pairs(wake) do
  local tokens = {}
  for i = 1, math.min(n, """ + str(NOTIFY_CAP) + r""") do tokens[i] = '1' end
  redis.call('RPUSH', nkey, unpack(tokens))
  redis.call('LTRIM', nkey, -""" + str(NOTIFY_CAP) + r""", -1)
end
return 1
"""

# KEYS: job hash, lease zset, index zset
# ARGV: base, id, token, expect, now, ttl_ms, expire_at, state, dead, attempts?, error?, result?, due, finished
_FINISH = _LUA_HELPERS + r"""
local base, id, token, expect, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ttl_ms, expire_at, state, dead = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local attempts, err, result, due, finished = ARGV[10], ARGV[11], ARGV[12], ARGV[13], ARGV[14]
local key = KEYS[1]
if redis.call('TYPE', key)['ok'] ~= 'hash' then return 0 end
local f = redis.call('HMGET', key, 'state', 'token', 'route', 'target')
if f[1] ~= expect or tonumber(f[2] or '0') ~= tonumber(token) or not f[3] then return 0 end
local route, target = f[3], f[4] or nil
local zkey = due_key(base, route, target)
redis.call('ZREM', zkey, id)
redis.call('ZREM', KEYS[2], id)
redis.call('HSET', key, 'state', state, 'kill_requested', '0', 'dead', dead)
redis.call('HDEL', key, 'owner', 'lease_until')
if attempts ~= '' then redis.call('HSET', key, 'attempts', string.sub(attempts, 2)) end
if err ~= '' then redis.call('HSET', key, 'error', string.sub(err, 2)) else redis.call('HDEL', key, 'error') end
local done = base .. 'done:' .. id
redis.call('DEL', done)
if state == 'pending' then
  redis.call('HSET', key, 'due', due)
  redis.call('HDEL', key, 'result', 'finished')
  redis.call('PERSIST', key)
  redis.call('ZADD', KEYS[3], '+inf', id)
  redis.call('ZADD', zkey, due, id)
  local nkey = notify_key(base, route, target)
  redis.call('RPUSH', nkey, '1')
  redis.call('LTRIM', nkey, -""" + str(NOTIFY_CAP) + r""", -1)
else
  if result ~= '' then redis.call('HSET', key, 'result', string.sub(result, 2))
  else redis.call('HDEL', key, 'result') end
  redis.call('HSET', key, 'finished', finished)
  redis.call('PEXPIRE', key, ttl_ms)
  redis.call('ZADD', KEYS[3], expire_at, id)
  redis.call('RPUSH', done, '1')
  redis.call('PEXPIRE', done, """ + str(DONE_TOKEN_MS) + r""")
end
return 1
"""

# _FINISH then _CLAIM in one round trip. KEYS: finish's 3 keys, then claim's 5.
# ARGV: n = how many of finish's arguments come first, then finish's, then claim's.
# Returns {finish's result, claim's result}.
_FINISH_AND_CLAIM = (
    _LUA_HELPERS
    + "local function finish(KEYS, ARGV)\n" + _FINISH[len(_LUA_HELPERS):] + "\nend\n"
    + "local function claim(KEYS, ARGV)\n" + _CLAIM[len(_LUA_HELPERS):] + "\nend\n"
    + r"""
local n = tonumber(ARGV[1])
local fa, ca = {}, {}
for i = 2, n + 1 do fa[#fa + 1] = ARGV[i] end
for i = n + 2, #ARGV do ca[#ca + 1] = ARGV[i] end
local done = finish({KEYS[1], KEYS[2], KEYS[3]}, fa)
return {done, claim({KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]}, ca)}
"""
)

# KEYS: lease zset; ARGV: base, lease_until, then (id, token) pairs. Returns one status per pair.
_RENEW = r"""
local base, until_ = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV, 2 do
  local id, token = ARGV[i], tonumber(ARGV[i + 1])
  local key = base .. 'j:' .. id
  local status = 'lost'
  if redis.call('TYPE', key)['ok'] == 'hash' then
    local f = redis.call('HMGET', key, 'state', 'token', 'kill_requested')
    if f[1] == 'running' and tonumber(f[2] or '0') == token then
      redis.call('HSET', key, 'lease_until', until_)
      redis.call('ZADD', KEYS[1], until_, id)
      status = (f[3] == '1') and 'kill' or 'ok'
    end
  end
  out[#out + 1] = status
end
return out
"""

# KEYS: job hash. Returns 1 if the running record was flagged.
_KILL = r"""
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'kill_requested', '1')
return 1
"""

# KEYS: a due zset, index zset; ARGV: base, batch. Deletes up to batch pending
# records listed in the zset; returns {deleted, examined}.
_PURGE = r"""
local base = ARGV[1]
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
local deleted = 0
for _, id in ipairs(ids) do
  local key = base .. 'j:' .. id
  redis.call('ZREM', KEYS[1], id)
  if redis.call('TYPE', key)['ok'] == 'hash' and redis.call('HGET', key, 'state') == 'pending' then
    redis.call('DEL', key)
    redis.call('ZREM', KEYS[2], id)
    deleted = deleted + 1
  end
end
return {deleted, #ids}
"""

# KEYS: job hash; ARGV: base, id, why, now, ttl_ms, expire_at
_QUARANTINE = _LUA_HELPERS + r"""
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then return 0 end
quarantine(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6])
return 1
"""

# KEYS: worker hash; ARGV: state, last_seen
_HEARTBEAT = r"""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'last_seen', ARGV[2])
return 1
"""


# -- connecting --------------------------------------------------------------------


@dataclass
class ConnSpec:
    """What ``conn_url`` + ``dbname`` mean, before anything connects."""

    cluster: bool
    kwargs: dict[str, Any] = field(default_factory=dict)          # for Redis / ConnectionPool
    nodes: list[tuple[str, int]] = field(default_factory=list)    # cluster start-up nodes


def parse_conn_url(url: str | None, db: str | None) -> ConnSpec:
    """Translate ``--url``/``--db`` into redis-py arguments; ConfigurationError if malformed.

    Accepts ``host:port``, ``redis://[user:pass@]host:port[/db]``, ``rediss://``
    (TLS), ``unix:///path/to.sock`` and ``redis+cluster://host:port[,host:port]``
    (or ``rediss+cluster://``). ``db`` overrides a database number in the URL.
    """
    url = url or DEFAULT_URL
    where = redact(url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        url = f"redis://{url}"
        scheme = "redis"
    scheme = scheme.lower()
    try:
        db_number = int(db) if db not in (None, "") else None
    except ValueError:
        raise ConfigurationError(f"Redis database {db!r} is not a number (use --db 0..15).") from None
    if db_number is not None and db_number < 0:
        raise ConfigurationError(f"Redis database {db!r} must not be negative.")

    if scheme in CLUSTER_SCHEMES:
        if db_number not in (None, 0):
            raise ConfigurationError(f"Redis Cluster has only database 0, not {db!r} ({where}).")
        userinfo, at, hosts = rest.rpartition("@")
        hosts, _, query = hosts.partition("?")
        hosts = hosts.rstrip("/")
        nodes = []
        for hostport in filter(None, hosts.split(",")):
            host, _, port = hostport.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigurationError(f"Redis Cluster address {where} needs host:port for every node.")
            nodes.append((host.strip("[]"), int(port)))
        if not nodes:
            raise ConfigurationError(f"Redis Cluster address {where} names no node.")
        # parse_url understands the user, password and TLS query options; reuse it.
        single = f"{CLUSTER_SCHEMES[scheme]}://{userinfo}{at}{hosts.split(',')[0]}"
        kwargs = _parse(single + (f"?{query}" if query else ""), where)
        for name in ("host", "port", "db", "path"):
            kwargs.pop(name, None)
        if kwargs.pop("connection_class", None) is SSLConnection:
            kwargs["ssl"] = True
        return ConnSpec(cluster=True, kwargs=kwargs, nodes=nodes)

    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigurationError(
            f"Redis address {where} has an unknown scheme; use host:port, redis://, rediss://, "
            "unix:// or redis+cluster://."
        )
    kwargs = _parse(url, where)
    if db_number is not None:
        kwargs["db"] = db_number
    return ConnSpec(cluster=False, kwargs=kwargs)


def _parse(url: str, where: str) -> dict[str, Any]:
    try:
        kwargs = dict(parse_url(url))
    except ValueError as exc:
        raise ConfigurationError(f"Cannot read the Redis address {where}: {_scrub(str(exc), url)}") from None
    # parse_url keeps percent-escapes in some redis-py versions; passwords may contain '@' or ':'.
    for name in ("username", "password"):
        if isinstance(kwargs.get(name), str):
            kwargs[name] = unquote(kwargs[name])
    return kwargs


def _scrub(text: str, url: str | None) -> str:
    """Remove anything password-like of ``url`` from an error text."""
    if url and "@" in url:
        userinfo = url.split("://", 1)[-1].rpartition("@")[0]
        password = userinfo.partition(":")[2]
        for secret in {password, unquote(password)} - {""}:
            text = text.replace(secret, "***")
    return text


class _LoggingRetry(Retry):
    """redis-py's retry with back-off that says when it is reconnecting."""

    def __init__(self, where: str, retries: int) -> None:
        super().__init__(ExponentialBackoff(cap=1.0, base=0.1), retries)
        self.where = where

    def call_with_retry(self, do: Callable[[], Any], fail: Callable[..., Any], *args: Any,
                        **kwargs: Any) -> Any:
        def logged(error: Exception, *rest: Any) -> Any:
            log.warning("connection to Redis at %s failed (%s); reconnecting", self.where,
                        type(error).__name__)
            return fail(error, *rest)

        return super().call_with_retry(do, logged, *args, **kwargs)


_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ClusterDownError, RedisClusterException)
F = TypeVar("F", bound=Callable[..., Any])


def _guarded(method: F) -> F:
    """Translate redis-py's connection errors into SkunkQueue's, without secrets."""

    @functools.wraps(method)
    def wrapper(self: RedisPersistence, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except AuthenticationError as exc:
            raise ConfigurationError(
                f"Redis at {self.where} refused the credentials: {_scrub(str(exc), self.url)}. "
                "Check the user and password in the URL."
            ) from None
        except _UNREACHABLE as exc:
            raise BackendUnavailable(
                f"Cannot reach Redis at {self.where}: {_scrub(str(exc), self.url) or type(exc).__name__}"
            ) from None

    return cast(F, wrapper)


class _Keys:
    """Key names of one queue. Must agree with the Lua helpers above."""

    def __init__(self, queue: str) -> None:
        self.base = f"sq:{{{escape(queue)}}}:"
        self.lease = self.base + "lease"
        self.index = self.base + "jobs"
        self.workers = self.base + "workers"

    def job(self, job_id: str) -> str:
        return f"{self.base}j:{job_id}"

    def done(self, job_id: str) -> str:
        return f"{self.base}done:{job_id}"

    def worker(self, worker_id: str) -> str:
        return f"{self.base}w:{worker_id}"

    def due(self, route: str, target: str | None = None) -> str:
        suffix = escape(route) if target is None else f"{escape(route)}:{escape(target)}"
        return f"{self.base}d:{suffix}"

    def notify(self, route: str, target: str | None = None) -> str:
        suffix = escape(route) if target is None else f"{escape(route)}:{escape(target)}"
        return f"{self.base}n:{suffix}"

    def targets(self, route: str) -> str:
        return f"{self.base}t:{escape(route)}"


class RedisPersistence(Persistence):
    """Redis and Redis Cluster. See the module docstring for the key layout."""

    name = "redis"
    notifies = True
    max_payload = 512 * 1024 * 1024  # Redis' largest string

    def __init__(self, queue: str, *, url: str | None = None, db: str | None = None,
                 connect_timeout: float = 3.0, socket_timeout: float = 15.0, retries: int = 3,
                 **options: Any) -> None:
        super().__init__(queue, url=url, db=db, **options)
        self.where = redact(url or DEFAULT_URL)
        spec = parse_conn_url(url, db)
        common = {"socket_connect_timeout": connect_timeout,
                  "socket_timeout": max(socket_timeout, MAX_BLOCK + 5), "decode_responses": False}
        self.keys = _Keys(queue)
        self._next_due: dict[str, float] = {}
        # Options given in the URL's query string (e.g. ?socket_timeout=30) win over ours.
        kwargs = {**common, **spec.kwargs, "retry": _LoggingRetry(self.where, retries)}
        try:
            if spec.cluster:
                self.client: redis.Redis | RedisCluster = RedisCluster(
                    startup_nodes=[ClusterNode(h, p) for h, p in spec.nodes], **kwargs)
            else:
                pool = redis.ConnectionPool(**kwargs)
                self.client = redis.Redis(connection_pool=pool)
        except AuthenticationError as exc:
            raise ConfigurationError(f"Redis at {self.where} refused the credentials: "
                                     f"{_scrub(str(exc), url)}") from None
        except _UNREACHABLE as exc:
            raise BackendUnavailable(f"Cannot reach Redis at {self.where}: {_scrub(str(exc), url)}") from None
        self.cluster = spec.cluster
        register = self.client.register_script
        self._enqueue = register(_ENQUEUE)
        self._claim = register(_CLAIM)
        self._finish = register(_FINISH)
        self._finish_claim = register(_FINISH_AND_CLAIM)
        self._renew = register(_RENEW)
        self._kill = register(_KILL)
        self._purge = register(_PURGE)
        self._quarantine = register(_QUARANTINE)
        self._heartbeat = register(_HEARTBEAT)
        # Fail here, with a clear message, rather than at the first job.
        self._ping()

    @_guarded
    def _ping(self) -> None:
        self.client.ping()

    def _expiry(self, now: float) -> tuple[int, str]:
        """PEXPIRE argument and index score of a record finished at ``now``."""
        return max(1, int(self.result_ttl * 1000)), _num(now + self.result_ttl)

    def _pipeline(self, transaction: bool = False) -> Any:
        return self.client.pipeline(transaction=transaction)

    # -- producers -----------------------------------------------------------------

    @_guarded
    def enqueue(self, records: Sequence[JobRecord]) -> None:
        if not records:
            return
        k = self.keys
        ttl_ms, _ = self._expiry(0)
        now = _num(time.time())
        # A script is atomic; one call per chunk keeps each one short, so other
        # clients are not blocked for long by a huge batch.
        chunks = [b"".join(b"%d:%s" % (len(packed), packed)
                           for packed in map(pack_record, records[start:start + ENQUEUE_CHUNK]))
                  for start in range(0, len(records), ENQUEUE_CHUNK)]
        if len(chunks) == 1:
            self._enqueue(keys=[k.lease, k.index], args=[k.base, ttl_ms, now, chunks[0]])
            return
        # MULTI/EXEC keeps a batch of several chunks all-or-nothing. redis-py's
        # cluster pipeline refuses scripts, but every key of the queue lives on
        # one node, so on a cluster the transaction goes to that node directly.
        client = self.client
        if isinstance(client, RedisCluster):
            client = client.get_node_from_key(k.index).redis_connection
        pipe = client.pipeline(transaction=True)
        for chunk in chunks:
            self._enqueue(keys=[k.lease, k.index], args=[k.base, ttl_ms, now, chunk], client=pipe)
        pipe.execute()

    @_guarded
    def get(self, job_id: str) -> JobRecord | None:
        try:
            flat = self.client.hgetall(self.keys.job(job_id))
        except ResponseError as exc:  # WRONGTYPE: something else lives under the key
            raise MalformedRecord(f"record {job_id!r} is not a hash: {exc}") from None
        return decode_record(cast("dict[bytes, bytes]", flat), job_id) if flat else None

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
                pipe.hmget(self.keys.job(_text(raw_id)), list(fields))
            for raw_id, values in zip(ids, pipe.execute(raise_on_error=False)):
                if isinstance(values, list) and values[0] is not None:
                    yield _text(raw_id), values

    @_guarded
    def list_jobs(self, *, route: str | None = None, state: str | None = None,
                  dead: bool | None = None, limit: int = 1000) -> list[JobRecord]:
        wanted: list[tuple[float, str]] = []
        for job_id, (r, s, d, due) in self._scan_index(("route", "state", "dead", "due")):
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

    @_guarded
    def counts(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for _, (route, state) in self._scan_index(("route", "state")):
            if route is None or state is None:
                continue
            pair = (route.decode(errors="replace"), state.decode(errors="replace"))
            counts[pair] = counts.get(pair, 0) + 1
        return counts

    @_guarded
    def purge(self, route: str, *, target: str | None = None) -> int:
        k = self.keys
        if target is not None:
            zsets = [k.due(route, target)]
        else:
            names = sorted(_text(t) for t in self.client.smembers(k.targets(route)))
            zsets = [k.due(route)] + [k.due(route, t) for t in names]
        deleted = 0
        for zkey in zsets:
            while True:
                n, examined = self._purge(keys=[zkey, k.index], args=[k.base, SCAN_BATCH])
                deleted += int(n)
                if int(examined) < SCAN_BATCH:
                    break
        return deleted

    @_guarded
    def request_kill(self, job_id: str) -> bool:
        return bool(self._kill(keys=[self.keys.job(job_id)]))

    # -- workers -----------------------------------------------------------------

    @_guarded
    def claim(self, route: str, worker_id: str, lease: float, limit: int = 1) -> list[JobRecord]:
        keys, args, now = self._claim_call(route, worker_id, lease, limit)
        return self._claimed(route, self._claim(keys=keys, args=args), now)

    def _claim_call(self, route: str, worker_id: str, lease: float,
                    limit: int) -> tuple[list[str], list[Any], float]:
        k = self.keys
        now = time.time()
        ttl_ms, expire_at = self._expiry(now)
        keys = [k.due(route), k.due(route, worker_id), k.lease, k.notify(route), k.notify(route, worker_id)]
        return keys, [k.base, _num(now), _num(now + lease), worker_id, int(limit), ttl_ms, expire_at], now

    def _claimed(self, route: str, reply: Any, now: float) -> list[JobRecord]:
        """Decode _CLAIM's reply; quarantine what does not decode."""
        k = self.keys
        hashes, next_due, foreign = reply
        self._next_due[route] = float(next_due) if next_due else math.inf
        for key in foreign:
            log.warning("queue %s route %s: skipped %s, which is not a SkunkQueue record",
                        self.queue, route, key.decode(errors="replace"))
        claimed = []
        for packed in hashes:
            fields = unpack_fields(packed)
            job_id = fields.get(b"id", b"?").decode(errors="replace")
            try:
                claimed.append(decode_record(fields, job_id))
            except MalformedRecord as exc:
                log.error("queue %s: quarantined record %s: %s", self.queue, job_id, exc)
                ttl_ms, expire_at = self._expiry(now)
                self._quarantine(keys=[k.job(job_id)],
                                 args=[k.base, job_id, str(exc), _num(now), ttl_ms, expire_at])
        return claimed

    @_guarded
    def renew(self, worker_id: str, leases: Sequence[tuple[str, int]], lease: float) -> dict[str, str]:
        if not leases:
            return {}
        args: list[Any] = [self.keys.base, _num(time.time() + lease)]
        for job_id, token in leases:
            args += [job_id, int(token)]
        statuses = self._renew(keys=[self.keys.lease], args=args)
        names = {b"ok": LEASE_OK, b"kill": LEASE_KILL, b"lost": LEASE_LOST}
        return {job_id: names[s] for (job_id, _), s in zip(leases, statuses)}

    @_guarded
    def finish(self, job_id: str, token: int, outcome: Outcome, *, expect: str = RUNNING) -> bool:
        keys, args = self._finish_call(job_id, token, outcome, expect)
        return bool(self._finish(keys=keys, args=args))

    @_guarded
    def finish_and_claim(self, job_id: str, token: int, outcome: Outcome, route: str, worker_id: str,
                         lease: float, limit: int = 1) -> tuple[bool, list[JobRecord]]:
        finish_keys, finish_args = self._finish_call(job_id, token, outcome, RUNNING)
        claim_keys, claim_args, now = self._claim_call(route, worker_id, lease, limit)
        applied, reply = self._finish_claim(keys=finish_keys + claim_keys,
                                            args=[len(finish_args), *finish_args, *claim_args])
        return bool(applied), self._claimed(route, reply, now)

    def _finish_call(self, job_id: str, token: int, outcome: Outcome,
                     expect: str) -> tuple[list[str], list[Any]]:
        k = self.keys
        now = time.time()
        finished = outcome.finished if outcome.finished is not None else now
        ttl_ms, expire_at = self._expiry(finished)
        error = json.dumps(outcome.error) if outcome.error is not None else None
        attempts = str(outcome.attempts) if outcome.attempts is not None else None
        return [k.job(job_id), k.lease, k.index], [
            k.base, job_id, int(token), expect, _num(now), ttl_ms, expire_at, outcome.state,
            "1" if outcome.dead else "0", _opt(attempts), _opt(error), _opt(outcome.result),
            _num(outcome.due if outcome.due is not None else now), _num(finished)]

    @_guarded
    def expired_leases(self, now: float, limit: int = 100) -> list[JobRecord]:
        k = self.keys
        pipe = self._pipeline()
        # Expired records' index entries go here: this runs about once a second per worker.
        pipe.zremrangebyscore(k.index, "-inf", f"({_num(now)}")
        pipe.zrangebyscore(k.lease, "-inf", f"({_num(now)}", start=0, num=int(limit))
        _, ids = pipe.execute()
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
                ttl_ms, expire_at = self._expiry(now)
                self._quarantine(keys=[k.job(job_id)], args=[k.base, job_id, str(exc), _num(now), ttl_ms, expire_at])
                continue
            if record.state == RUNNING:
                records.append(record)
            else:
                self.client.zrem(k.lease, raw_id)
        return records

    @_guarded
    def register_worker(self, info: WorkerInfo) -> None:
        key = self.keys.worker(info.id)
        pipe = self._pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(key, mapping={name: str(value) if not isinstance(value, float) else _num(value)
                                for name, value in info.to_dict().items()})
        pipe.sadd(self.keys.workers, info.id)
        pipe.execute()

    @_guarded
    def heartbeat(self, worker_id: str, state: str) -> bool:
        return bool(self._heartbeat(keys=[self.keys.worker(worker_id)], args=[state, _num(time.time())]))

    @_guarded
    def unregister_worker(self, worker_id: str) -> None:
        pipe = self._pipeline(transaction=True)
        pipe.delete(self.keys.worker(worker_id))
        pipe.srem(self.keys.workers, worker_id)
        pipe.execute()

    @_guarded
    def workers(self) -> list[WorkerInfo]:
        ids = sorted(_text(raw) for raw in self.client.smembers(self.keys.workers))
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

    # -- waiting -------------------------------------------------------------------

    @_guarded
    def wait_for_work(self, routes: Sequence[str], worker_id: str, timeout: float) -> None:
        # The last claim told us when the next known record becomes due: wake then at the latest.
        now = time.time()
        soonest = min((self._next_due.get(r, math.inf) for r in routes), default=math.inf)
        timeout = min(timeout, soonest - now, MAX_BLOCK)
        if timeout < 0.001:
            return
        keys = [key for r in routes for key in (self.keys.notify(r), self.keys.notify(r, worker_id))]
        self.client.blpop(keys, timeout=timeout)

    @_guarded
    def wait_finished(self, job_id: str, timeout: float | None) -> JobRecord | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        done = self.keys.done(job_id)
        while True:
            record = self.get(job_id)
            if record is None or record.finished_state:
                return record
            block = MAX_BLOCK
            if deadline is not None:
                block = min(block, deadline - time.monotonic())
                if block <= 0:
                    return record
            # BLMOVE onto the same list leaves the token for every other waiter.
            # Redis takes a fractional timeout; redis-py's stub says int.
            self.client.blmove(done, done, max(block, 0.01), "RIGHT", "LEFT")  # type: ignore[arg-type]

    def close(self) -> None:
        self.client.close()

