"""Reaching Redis: what ``--url``/``--db`` mean, TLS and Cluster, retries, and keeping secrets out of errors."""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar, cast
from urllib.parse import unquote

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.connection import SSLConnection, parse_url
from redis.exceptions import (
    AuthenticationError,
    ClusterDownError,
    NoScriptError,
    RedisClusterException,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from skunkqueue.errors import BackendUnavailable, ConfigurationError

try:  # redis[hiredis] brings it; without it, redis-py's own packer
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - a redis-py installed without its extra
    _hiredis_pack = None  # type: ignore[assignment]
from skunkqueue.urls import redact, scrub

log = logging.getLogger("skunkqueue.redis")

DEFAULT_URL = "localhost:6379"
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
SENTINEL_SCHEMES = {"redis+sentinel": "redis", "rediss+sentinel": "rediss"}


@dataclass
class ConnSpec:
    """What ``conn_url`` + ``dbname`` mean, before anything connects."""

    cluster: bool
    kwargs: dict[str, Any] = field(default_factory=dict)          # for Redis / ConnectionPool
    nodes: list[tuple[str, int]] = field(default_factory=list)    # cluster start-up nodes, or the sentinels
    service: str | None = None                                    # Sentinel: the monitored primary's name
    sentinel_kwargs: dict[str, Any] = field(default_factory=dict)  # Sentinel: for the sentinels themselves
    wait_replicas: int = 0          # ?wait_replicas=N: an enqueue is acknowledged once N replicas have it
    wait_timeout_ms: int = 2000     # ?wait_timeout_ms=: how long WAIT may take before the enqueue fails


def parse_conn_url(url: str | None, db: str | None) -> ConnSpec:
    """Translate ``--url``/``--db`` into redis-py arguments; ConfigurationError if malformed.

    Accepts ``host:port``, ``redis://[user:pass@]host:port[/db]``, ``rediss://``
    (TLS), ``unix:///path/to.sock`` and ``redis+cluster://host:port[,host:port]``
    (or ``rediss+cluster://``), and
    ``redis+sentinel://host:port[,host:port]/service[/db][?db=N&sentinel_password=...]``
    (or ``rediss+sentinel://``), whose primary is asked of the sentinels at every
    (re)connection. ``db`` overrides a database number in the URL.
    """
    url = url or DEFAULT_URL
    where = redact(url)
    url, wait_replicas = _take_option(url, "wait_replicas", where)
    url, wait_timeout_ms = _take_option(url, "wait_timeout_ms", where)
    spec = _parse_spec(url, where, db)
    if wait_replicas is not None:
        if spec.cluster:
            raise ConfigurationError(f"wait_replicas is not supported on Redis Cluster ({where}).")
        spec.wait_replicas = wait_replicas
    if wait_timeout_ms is not None:
        if wait_timeout_ms < 1:
            raise ConfigurationError(f"wait_timeout_ms must be at least 1 ({where}).")
        spec.wait_timeout_ms = wait_timeout_ms
    return spec


def _take_option(url: str, name: str, where: str) -> tuple[str, int | None]:
    """``url`` without the query option ``name``, and its value (a whole number ≥ 0) if given."""
    base, sep, query = url.partition("?")
    if not sep:
        return url, None
    pairs = [pair for pair in query.split("&") if pair]
    mine = [pair.partition("=")[2] for pair in pairs if pair.partition("=")[0] == name]
    if not mine:
        return url, None
    rest = "&".join(pair for pair in pairs if pair.partition("=")[0] != name)
    value = unquote(mine[-1])
    if not value.isdigit():
        raise ConfigurationError(f"{name}={value!r} in the Redis address {where} must be a whole number ≥ 0.")
    return (f"{base}?{rest}" if rest else base), int(value)


def _parse_spec(url: str, where: str, db: str | None) -> ConnSpec:
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

    if scheme in SENTINEL_SCHEMES:
        return _parse_sentinel(scheme, rest, where, db_number)

    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigurationError(
            f"Redis address {where} has an unknown scheme; use host:port, redis://, rediss://, "
            "unix://, redis+cluster:// or redis+sentinel://."
        )
    kwargs = _parse(url, where)
    if db_number is not None:
        kwargs["db"] = db_number
    return ConnSpec(cluster=False, kwargs=kwargs)


def _parse_sentinel(scheme: str, rest: str, where: str, db_number: int | None) -> ConnSpec:
    """``redis+sentinel://[user:pass@]host:port[,host:port]/service[/db][?query]``."""
    userinfo, at, tail = rest.rpartition("@")
    tail, _, query = tail.partition("?")
    hosts, _, path = tail.partition("/")
    service, _, db_path = path.strip("/").partition("/")
    if not service:
        raise ConfigurationError(f"Redis Sentinel address {where} names no primary; add its name as the "
                                 "path, e.g. redis+sentinel://host:26379/mymaster.")
    nodes = []
    for hostport in filter(None, hosts.split(",")):
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigurationError(f"Redis Sentinel address {where} needs host:port for every sentinel.")
        nodes.append((host.strip("[]"), int(port)))
    if not nodes:
        raise ConfigurationError(f"Redis Sentinel address {where} names no sentinel.")
    # The sentinels' own password (they rarely share the data nodes'); the rest of the query is parse_url's.
    options = [pair for pair in query.split("&") if pair]
    sentinel_password = [unquote(p.partition("=")[2]) for p in options if p.startswith("sentinel_password=")]
    options = [p for p in options if not p.startswith("sentinel_password=")]
    single = f"{SENTINEL_SCHEMES[scheme]}://{userinfo}{at}{hosts.split(',')[0]}"
    if db_path:
        single += f"/{db_path}"
    kwargs = _parse(single + (f"?{'&'.join(options)}" if options else ""), where)
    for name in ("host", "port", "path"):
        kwargs.pop(name, None)
    if kwargs.pop("connection_class", None) is SSLConnection:
        kwargs["ssl"] = True  # SentinelConnectionPool picks its TLS connection class from this
    if db_number is not None:
        kwargs["db"] = db_number
    sentinel_kwargs: dict[str, Any] = {}
    if sentinel_password:
        sentinel_kwargs["password"] = sentinel_password[-1]
    return ConnSpec(cluster=False, kwargs=kwargs, nodes=nodes, service=service, sentinel_kwargs=sentinel_kwargs)


def _parse(url: str, where: str) -> dict[str, Any]:
    try:
        kwargs = dict(parse_url(url))
    except ValueError as exc:
        raise ConfigurationError(f"Cannot read the Redis address {where}: {scrub(str(exc), url)}") from None
    # parse_url keeps percent-escapes in some redis-py versions; passwords may contain '@' or ':'.
    for name in ("username", "password"):
        if isinstance(kwargs.get(name), str):
            kwargs[name] = unquote(kwargs[name])
    return kwargs


class _LoggingBackoff(ExponentialBackoff):
    """redis-py's exponential back-off that notes each retry at INFO.

    Each attempt is logged quietly: when the retries run out the caller gets
    one BackendUnavailable that says what failed, and a command line tool
    prints only that. The note is made here, where a retry waits, and not by
    wrapping Retry.call_with_retry: that wrapper cost 2.4 us on every command.
    """

    def __init__(self, where: str) -> None:
        super().__init__(cap=1.0, base=0.1)
        self.where = where

    def compute(self, failures: int) -> float:
        # Retry calls this inside its ``except`` block: the error being retried is the current one.
        error = sys.exc_info()[1]
        log.info("connection to Redis at %s failed (%s); reconnecting", self.where,
                 type(error).__name__ if error is not None else "error")
        return float(super().compute(failures))


def _logging_retry(where: str, retries: int) -> Retry:
    return Retry(_LoggingBackoff(where), retries)


UNREACHABLE = (RedisConnectionError, RedisTimeoutError, ClusterDownError, RedisClusterException)
F = TypeVar("F", bound=Callable[..., Any])

# The asyncio client's pool size when neither the URL (?max_connections=N) nor the option sets it.
# Commands beyond it wait for a connection (up to POOL_WAIT seconds) instead of failing at once.
ASYNC_MAX_CONNECTIONS = 50
POOL_WAIT = 20.0
# What redis-py's pools say when every connection is taken: the sync pool at once, the
# blocking (asyncio) pool after POOL_WAIT. Both are ConnectionErrors, but nothing is unreachable.
_POOL_EXHAUSTED = ("Too many connections", "No connection available")


def pool_exhausted(exc: Exception) -> bool:
    """Whether ``exc`` is a redis-py pool out of connections, not a connection that failed."""
    return isinstance(exc, RedisConnectionError) and str(exc).startswith(_POOL_EXHAUSTED)


def translate(exc: Exception, where: str, url: str | None) -> Exception | None:
    """SkunkQueue's error for one of redis-py's (sync or asyncio client alike), without secrets; None if not ours."""
    if isinstance(exc, AuthenticationError):
        return ConfigurationError(f"Redis at {where} refused the credentials: {scrub(str(exc), url)}. "
                                  "Check the user and password in the URL.")
    if pool_exhausted(exc):
        return BackendUnavailable(
            f"The connection pool for Redis at {where} is exhausted (every connection is in use): "
            "raise max_connections (?max_connections=N in the URL, or the max_connections option).")
    if isinstance(exc, UNREACHABLE):
        return BackendUnavailable(f"Cannot reach Redis at {where}: {scrub(str(exc), url) or type(exc).__name__}")
    return None


def guarded(method: F) -> F:
    """Translate redis-py's connection errors into SkunkQueue's, without secrets.

    The method's object has ``where`` (the redacted address) and ``url``.
    """

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (AuthenticationError, *UNREACHABLE) as exc:
            raise cast(Exception, translate(exc, self.where, self.url)) from None

    return cast(F, wrapper)


class HotLine:
    """A connection of its own for script calls, beside the client's pool (not for Cluster).

    A worker makes one script call per job (``finish_and_claim``) and a producer
    one per ``fire``. redis-py's command path around each (taking a connection
    from the pool and giving it back, the retry wrapper, response callbacks,
    metrics hooks) cost ~50 us of CPU per call here, more than sending the
    command and reading the reply on a connection (~60 against ~115 us per call,
    measured with an empty script). A call finds the line busy (another thread
    is on it) or broken and takes redis-py's path instead, with its retries and
    back-off: the same behaviour, only slower.
    """

    def __init__(self, client: Any) -> None:
        # Only the sync single-server client: asyncio clients have their own path (aio.py).
        self._client = client
        self._pool = client.connection_pool if isinstance(client, redis.Redis) else None
        self._conn: Any = None
        self._busy = threading.Lock()

    def run(self, script: Script, keys: list[Any], args: list[Any]) -> Any:
        """What ``script(keys=keys, args=args)`` returns."""
        conn = self._take()
        if conn is None:
            return script(keys=keys, args=args)
        try:
            return self._evalsha(conn, script, keys, args)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            # Like a failed attempt of redis-py's retry loop (which would also send it
            # again): the rest of the attempts, with back-off, on the pool's connections.
            self._drop(conn)
        finally:
            self._busy.release()
        return script(keys=keys, args=args)

    def then(self, command: tuple[Any, ...], second: Script | tuple[Any, ...], keys: list[Any] | None = None,
             args: list[Any] | None = None) -> tuple[Any, Any]:
        """``command``'s reply and ``second``'s (a command, or a script with ``keys`` and ``args``),
        both sent in one write: Redis runs ``second`` as soon as ``command`` returns, in the same
        round trip even when ``command`` blocks (a client's next command waits for its blocked one).
        On a connection of the pool, not the line: a blocking ``command`` would hold the line for
        other threads' calls. The replies are raw (no response callbacks). A connection that fails
        goes to redis-py's path, one command after the other, with its retries."""
        if self._pool is None:
            return self._client_then(command, second, keys, args)
        later = ("EVALSHA", second.sha, len(keys or ()), *(keys or ()), *(args or ())) \
            if isinstance(second, Script) else second
        conn = self._pool.get_connection()
        try:
            conn.send_packed_command(conn.pack_commands([command, later]))
            try:
                first = conn.read_response()
            except BaseException:
                conn.disconnect()  # the second reply is still on the way: this connection is out of step
                raise
            try:
                return first, conn.read_response()
            except NoScriptError:  # a restarted or flushed server: ``command`` ran; run the script alone
                assert isinstance(second, Script)
                return first, self._evalsha(conn, second, keys or [], args or [])
        except (RedisConnectionError, RedisTimeoutError, OSError):
            conn.disconnect()
        finally:
            self._pool.release(conn)
        return self._client_then(command, second, keys, args)

    def _client_then(self, command: tuple[Any, ...], second: Script | tuple[Any, ...], keys: list[Any] | None,
                     args: list[Any] | None) -> tuple[Any, Any]:
        # redis-py's path, one command after the other, with its retries (no line, or the line busy or broken).
        client = self._client
        first = client.execute_command(*command)
        if isinstance(second, Script):
            return first, second(keys=keys, args=args)
        return first, client.execute_command(*second)

    def _take(self) -> Any:
        """The line's connection, locked for the caller (release ``_busy`` after); None if not free."""
        if self._pool is None or not self._busy.acquire(blocking=False):
            return None
        try:
            conn = self._conn
            if conn is None or conn.pid != os.getpid():  # new, or inherited through a fork
                conn = self._conn = self._pool.make_connection()
                # Connect here, as the pool does before it lends one: a Sentinel-managed
                # connection asks for the primary only in connect(); the send path's own
                # implicit connect (redis-py 8) would go to its default, localhost:6379.
                conn.connect()
            return conn
        except BaseException:
            self._busy.release()
            raise

    def _drop(self, conn: Any) -> None:
        conn.disconnect()
        self._conn = None

    @staticmethod
    def _evalsha(conn: Any, script: Script, keys: list[Any], args: list[Any]) -> Any:
        # Packed by hiredis in one C call: redis-py's packer encodes each argument in Python
        # (~15 us a call for the ~30 arguments of a script call; the bytes sent are the same).
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        packed = [_hiredis_pack(command)] if _hiredis_pack is not None else conn.pack_command(*command)
        try:
            conn.send_packed_command(packed)
            return conn.read_response()
        except NoScriptError:  # a restarted or flushed server: load it, once
            conn.send_command("SCRIPT", "LOAD", script.script)
            conn.read_response()
            conn.send_packed_command(packed)
            return conn.read_response()

    def close(self) -> None:
        with self._busy:
            if self._conn is not None:
                self._conn.disconnect()
                self._conn = None


def _client_args(url: str | None, db: str | None, connect_timeout: float,
                 socket_timeout: float) -> tuple[str, ConnSpec, dict[str, Any]]:
    """The redacted address, the parsed URL and the client arguments both clients (sync, asyncio) share."""
    spec = parse_conn_url(url, db)
    common = {"socket_connect_timeout": connect_timeout, "socket_timeout": socket_timeout,
              "decode_responses": False}
    # Options given in the URL's query string (e.g. ?socket_timeout=30) win over ours.
    return redact(url or DEFAULT_URL), spec, {**common, **spec.kwargs}


def _sentinel_kwargs(spec: ConnSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Arguments for the connections to the sentinels: our timeouts and TLS, their own password."""
    own: dict[str, Any] = {name: kwargs[name] for name in ("socket_connect_timeout", "socket_timeout")
                           if name in kwargs}
    if kwargs.get("ssl"):
        own.update({k: v for k, v in kwargs.items() if k.startswith("ssl")})
    return {**own, **spec.sentinel_kwargs}


def connect(url: str | None, db: str | None, *, connect_timeout: float, socket_timeout: float,
            retries: int, max_connections: int | None = None) -> tuple[redis.Redis | RedisCluster, bool]:
    """A client for ``url``/``db`` (nothing is sent yet) and whether it is a cluster client."""
    where, spec, kwargs = _client_args(url, db, connect_timeout, socket_timeout)
    if max_connections is not None:
        kwargs["max_connections"] = max_connections
    kwargs["retry"] = _logging_retry(where, retries)
    try:
        if spec.cluster:
            return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in spec.nodes], **kwargs), True
        if spec.service is not None:
            from redis.sentinel import Sentinel

            # Every new connection asks the sentinels for the current primary, so a failover
            # costs the commands in flight (retried with back-off) and nothing else.
            sentinel = Sentinel(spec.nodes, sentinel_kwargs=_sentinel_kwargs(spec, kwargs), **kwargs)
            return sentinel.master_for(spec.service, redis_class=redis.Redis), False
        return redis.Redis(connection_pool=redis.ConnectionPool(**kwargs)), False
    except (AuthenticationError, *UNREACHABLE) as exc:
        raise cast(Exception, translate(exc, where, url)) from None


def aconnect(url: str | None, db: str | None, *, connect_timeout: float, socket_timeout: float,
             retries: int, max_connections: int | None = None) -> Any:
    """The asyncio client (``redis.asyncio``) for what :func:`connect` connects to: same address, TLS,
    credentials, timeouts and retries. It belongs to the running event loop; nothing is sent yet."""
    import redis.asyncio
    import redis.asyncio.cluster
    import redis.asyncio.connection
    import redis.asyncio.retry

    where, spec, kwargs = _client_args(url, db, connect_timeout, socket_timeout)
    if max_connections is not None:
        kwargs["max_connections"] = max_connections
    kwargs["retry"] = redis.asyncio.retry.Retry(_LoggingBackoff(where), retries)
    sync_class = kwargs.pop("connection_class", None)
    if sync_class is not None:  # parse_url picked a sync class (TLS, unix socket): take its asyncio twin
        kwargs["connection_class"] = getattr(redis.asyncio.connection, sync_class.__name__)
    if spec.cluster:
        nodes = [redis.asyncio.cluster.ClusterNode(h, p) for h, p in spec.nodes]
        return redis.asyncio.RedisCluster(startup_nodes=nodes, **kwargs)
    if spec.service is not None:
        import redis.asyncio.sentinel

        kwargs.pop("connection_class", None)  # the sentinel pool brings its own (TLS from ssl=True)
        sentinel = redis.asyncio.sentinel.Sentinel(spec.nodes, sentinel_kwargs=_sentinel_kwargs(spec, kwargs),
                                                   **kwargs)
        return sentinel.master_for(spec.service, redis_class=redis.asyncio.Redis)
    # (Sentinel's pool cannot block: there the pool is unbounded unless max_connections is given.)
    # A blocking pool: a burst of commands (2,000 ``aresult`` looking at once) queues for the
    # pool's connections rather than failing with "Too many connections".
    kwargs.setdefault("max_connections", ASYNC_MAX_CONNECTIONS)
    pool = redis.asyncio.BlockingConnectionPool(timeout=POOL_WAIT, **kwargs)
    return redis.asyncio.Redis(connection_pool=pool)
