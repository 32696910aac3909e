"""Flow control: priorities, per-key limits, route limits and paused routes.

Everything here is decided at fire time or stored as a setting, so that the
store can enforce it inside its claim without running user code:

* A job's **priority** (an int from :data:`MIN_PRIORITY` to :data:`MAX_PRIORITY`,
  default 0) travels in its record; within a route, higher runs first, FIFO
  among equals.
* A :class:`Limit` turns into four record fields at fire time: ``limit_key``
  (the function's name and the key's value, as JSON: any text is safe in it),
  ``limit_concurrency``, ``limit_interval`` (seconds between two starts, from
  the rate) and ``limit_burst``.
* A route's limits and its paused flag are settings of the queue
  (:func:`limit_setting`, :func:`pause_setting`); the claim reads them in its
  atomic step.

Concurrency is counted, not kept: a slot of key K is a record in state
``running`` with ``limit_key`` K whose ``lease_until`` is after the store's
now. The pool's lease renewal renews it, the finish releases it in its own
atomic step, and a stopped or killed worker's slot comes back exactly when
its lease runs out. There is no counter that could leak.

Rates are GCRA (the generic cell rate algorithm, a token bucket kept as one
time per key): :func:`gcra` holds the rule, and each backend applies it on
the store's clock in the claim's atomic step. With ``rate="N/P"`` and
``burst=B`` the starts in any window of ``W`` seconds are at most
``B + W * N / P`` (rounded down): ``B`` may start at once after a quiet
spell, then one every ``P / N`` seconds. The default burst is what the rate
allows in 10 ms, at least 1 (:func:`default_burst`): rates up to 100/s space
starts evenly, and a faster one lets one claim take several jobs at once,
which keeps a worker's prefetch worth having under a high route rate.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol, Sequence

from skunkqueue.errors import ConfigurationError
from skunkqueue.record import PENDING, RUNNING, JobRecord, WorkerInfo


class Persistence(Protocol):
    """What these rules read of a store (a :class:`skunkqueue.persistence.Persistence`, which
    stands on this module: its claims use the rules)."""

    @property
    def name(self) -> str: ...

    @property
    def supports_settings(self) -> bool: ...

    @property
    def supports_limits(self) -> bool: ...

    @property
    def supports_pause(self) -> bool: ...

    def get_setting(self, name: str) -> str | None: ...

    def counts(self) -> dict[tuple[str, str], int]: ...

    def workers(self) -> list[WorkerInfo]: ...

    def flow_waiting(self, route: str) -> int: ...

    def now(self) -> float: ...

    def list_jobs(self, *, route: str | None = None, state: str | None = None,
                  dead: bool | None = None, limit: int = 1000) -> list[JobRecord]: ...

    def rate_times(self, names: Sequence[str]) -> dict[str, float]: ...

MIN_PRIORITY = -1000
MAX_PRIORITY = 1000
# Limit keys are parts of index entries and store keys: the value a key function returns
# may take this many bytes in UTF-8.
MAX_KEY_BYTES = 512
# How many due records one claim looks at, at most, past those it takes: records blocked by
# their key's limit are skipped (no head-of-line blocking), but only this far into the route.
FLOW_SCAN = 1000

# How long a claiming process may go on using a route's flow settings it read (seconds).
SETTINGS_TTL = 1.0

_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
          "h": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*$")

# Setting names: one per route and kind, so that a pause and a limit set at once by two
# operators never overwrite each other.
_LIMIT_PREFIX = "flow.limit:"
_PAUSE_PREFIX = "flow.paused:"


@dataclass(frozen=True)
class Rate:
    """``count`` starts per ``period`` seconds."""

    count: int
    period: float

    @property
    def interval(self) -> float:
        """Seconds between two starts at the steady rate."""
        return self.period / self.count

    def __str__(self) -> str:
        for unit, seconds in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
            if self.period == seconds:
                return f"{self.count}/{unit}"
        return f"{self.count}/{self.period:g}s"


# A rate with no burst given may start this many seconds' worth at once: small enough that no
# rate up to 100/s bunches (a partner API's "20/s" means spaced), large enough that a claim
# under a high rate ("1000000/s", a limit set but never reached) still takes a prefetch's fill.
DEFAULT_BURST_WINDOW = 0.01


def default_burst(rate: Rate) -> int:
    """The burst of a rate given without one: its starts in :data:`DEFAULT_BURST_WINDOW`, at least 1."""
    return max(1, int(DEFAULT_BURST_WINDOW / rate.interval + 1e-9))


def parse_rate(text: Any) -> Rate:
    """``"100/m"``, ``"50/s"``, ``"10/h"``, ``"1/d"``, ``"5/10s"``, or ConfigurationError in one line."""
    match = _RATE.match(text) if isinstance(text, str) else None
    unit = _UNITS.get(match.group(3)) if match else None
    if match is None or unit is None:
        raise ConfigurationError(f"A rate is a count per s, m, h or d, e.g. rate='100/m' or '5/10s', "
                                 f"not {text!r}.")
    count, period = int(match.group(1)), float(match.group(2) or 1) * unit
    if count < 1 or period <= 0 or not math.isfinite(period):
        raise ConfigurationError(f"A rate needs at least 1 start per a positive period, not {text!r}.")
    return Rate(count, period)


def _check_count(name: str, value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{what}: {name} must be a whole number of at least 1, not {value!r}.")
    return value


def check_priority(priority: Any, what: str = "priority") -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ConfigurationError(f"{what} must be a whole number from {MIN_PRIORITY} to {MAX_PRIORITY} "
                                 f"(higher runs first), not {priority!r}.")
    return priority


class Limit:
    """How many runs of a job may hold a slot at once, and how fast they may start, per key.

    ``key`` is called at fire time with the job's arguments (a workflow step's
    declared ones) and returns a str or int: jobs of one function with equal
    keys share the limit. Without ``key`` the function has one limit.
    ``concurrency``: at most this many run at once. ``rate``: at most this
    many start per period (``"100/m"``), with ``burst`` starts at once after a
    quiet spell (default: :func:`default_burst`, 1 for rates up to 100/s). Give ``concurrency``, ``rate`` or both.
    """

    def __init__(self, key: Callable[..., Any] | None = None, *, concurrency: int | None = None,
                 rate: str | None = None, burst: int | None = None) -> None:
        if key is not None and not callable(key):
            raise ConfigurationError(f"Limit(key=...) takes a function of the job's arguments, not {key!r}.")
        self.key = key
        self.concurrency = _check_count("concurrency", concurrency, "Limit")
        self.rate = None if rate is None else parse_rate(rate)
        self.burst = _check_count("burst", burst, "Limit")
        if self.concurrency is None and self.rate is None:
            raise ConfigurationError("A Limit needs concurrency=N, rate='N/period' or both.")
        if self.burst is not None and self.rate is None:
            raise ConfigurationError("Limit(burst=...) only means something with a rate.")

    def __repr__(self) -> str:
        parts = [f"concurrency={self.concurrency}"] if self.concurrency else []
        if self.rate:
            parts.append(f"rate='{self.rate}'")
            if self.burst:
                parts.append(f"burst={self.burst}")
        return f"Limit({', '.join(parts)})"

    def key_for(self, function: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The record's ``limit_key`` for one call: the function and the key's value, as JSON."""
        value: Any = ""
        if self.key is not None:
            try:
                value = self.key(*args, **kwargs)
            except Exception as exc:
                raise ConfigurationError(f"The limit key of {function} raised {type(exc).__name__}: {exc} "
                                         "(it is called with the job's arguments).") from None
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise ConfigurationError(f"The limit key of {function} returned {type(value).__name__}; "
                                         "return a str or an int.")
            value = str(value)
            try:
                size = len(value.encode("utf-8"))
            except UnicodeEncodeError:
                raise ConfigurationError(f"The limit key of {function} returned text that is not valid "
                                         "Unicode (a lone surrogate?).") from None
            if size > MAX_KEY_BYTES:
                raise ConfigurationError(f"The limit key of {function} is {size} bytes long; keys take up "
                                         f"to {MAX_KEY_BYTES} bytes in UTF-8 (hash longer ones).")
        return json.dumps([function, value], ensure_ascii=False)

    def fields(self, function: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The record fields of one call."""
        return {"limit_key": self.key_for(function, args, kwargs), "limit_concurrency": self.concurrency,
                "limit_interval": None if self.rate is None else self.rate.interval,
                "limit_burst": None if self.rate is None else (self.burst or default_burst(self.rate))}


def gcra(tat: float | None, now: float, interval: float, burst: int) -> tuple[bool, float]:
    """One start against a rate: ``(True, new_tat)`` if it may start now, else ``(False, when)``.

    ``tat`` is the key's theoretical arrival time (None: never started, or
    long ago); ``when`` is the earliest time the start is allowed. Stores
    keep ``new_tat`` per key in the claim's atomic step; a tat in the past
    means the same as none, so it may be dropped.
    """
    at = now if tat is None or tat < now else tat
    tolerance = (burst - 1) * interval
    if at - now > tolerance + 1e-9:
        return False, at - tolerance
    return True, at + interval


# What Admission.admit decides for one record.
TAKE, SKIP, STOP = "take", "skip", "stop"


class Admission:
    """One claim's flow-control decisions, in claim order: the rule of the Persistence docstring,
    once for every backend whose claim runs in Python (SQLite, PostgreSQL, FDB).

    The backend reads its store; this decides. ``read_time(name)`` returns a stored GCRA time
    (:func:`key_tat`/:func:`route_tat` names; called at most once per name and claim).
    :meth:`admit` is asked about each candidate record in claim order, with ``key_full(key, cap)``
    telling whether the key's live leases (those this claim took included) fill its ``cap`` (None:
    no concurrency limit; it is asked anyway, before the key's rate, so that a store may take the
    key's lock there): None if a slot is free, else when the first lease runs out (0: not known). It answers
    :data:`TAKE` (the rates are charged), :data:`SKIP` (a limit of the record's key stops it: the
    claim goes on behind it) or :data:`STOP` (the route's rate: the claim ends). The new times
    are in :attr:`changed`, to be written in the claim's atomic step (see :meth:`to_write`);
    :attr:`held_back` and :attr:`wake` say whether a limit left records behind and when the
    first of them may be claimable.
    """

    def __init__(self, now: float, route: str, route_limit: RouteLimit | None,
                 read_time: Callable[[str], float | None]) -> None:
        self.now = now
        self.route_limit = route_limit
        self.route_name = route_tat(route)
        self._read_time = read_time
        self.times: dict[str, float | None] = {}  # read or set in this claim
        self.changed: dict[str, float] = {}  # set in this claim
        self.blocked: set[str] = set()  # keys a limit stopped in this claim
        self.held_back = False
        self.wake: float | None = None

    def known(self, name: str, tat: float | None) -> None:
        """A stored time the backend read with another statement (no separate read then)."""
        self.times.setdefault(name, tat)

    def stored_time(self, name: str) -> float | None:
        if name not in self.times:
            self.times[name] = self._read_time(name)
        return self.times[name]

    def hold(self, at: float | None) -> None:
        """Records are left behind; one may become claimable at ``at`` (None or 0: not known)."""
        self.held_back = True
        if at is not None and at > 0:
            self.wake = at if self.wake is None else min(self.wake, at)

    def admit(self, key: str | None, concurrency: int | None, interval: float | None, burst: int | None,
              key_full: Callable[[str, int | None], float | None]) -> str:
        """TAKE, SKIP or STOP for one record with these limit fields (see the class)."""
        key_time = None
        if key is not None:
            if key in self.blocked:
                return SKIP
            free_at = key_full(key, concurrency)
            if free_at is None and interval:
                ok, key_time = gcra(self.stored_time(key_tat(key)), self.now, interval, burst or 1)
                free_at = None if ok else key_time
            if free_at is not None:
                self.blocked.add(key)
                self.hold(free_at)
                return SKIP
        limit = self.route_limit
        if limit is not None and limit.interval is not None:
            ok, route_time = gcra(self.stored_time(self.route_name), self.now, limit.interval, limit.burst)
            if not ok:
                self.hold(route_time)
                return STOP
            self.times[self.route_name] = self.changed[self.route_name] = route_time
        if key is not None and key_time is not None:
            name = key_tat(key)
            self.times[name] = self.changed[name] = key_time
        return TAKE

    def to_write(self, horizon: float) -> list[tuple[str, float]]:
        """The changed times to store, leaving out those not after ``horizon``: a time no later
        claim's now can precede. A time in the past means what no time means (:func:`gcra`), so
        such a write changes no later decision: with a rate far from reached (its interval
        shorter than the claim), a store whose claims run one at a time on one clock (SQLite,
        ``horizon`` read at the claim's end) skips it; others pass the claim's now."""
        return [(name, at) for name, at in self.changed.items() if at > horizon]


@dataclass(frozen=True)
class RouteLimit:
    """A route's own limits (``queue.limit``), over every job of the route."""

    concurrency: int | None = None
    rate: Rate | None = None
    burst: int = 1

    @property
    def interval(self) -> float | None:
        return None if self.rate is None else self.rate.interval

    def to_json(self) -> str:
        return json.dumps({"concurrency": self.concurrency, "rate": str(self.rate) if self.rate else None,
                           "interval": self.interval, "burst": self.burst})

    @classmethod
    def from_json(cls, text: str | None) -> RouteLimit | None:
        """The stored limit, or None when there is none or the setting is not one of ours."""
        if not text:
            return None
        try:
            data = json.loads(text)
            rate = parse_rate(data["rate"]) if data.get("rate") else None
            return cls(_check_count("concurrency", data.get("concurrency"), "route limit"), rate,
                       int(data.get("burst") or 1))
        except (ValueError, TypeError, KeyError, ConfigurationError):
            return None

    def __str__(self) -> str:
        parts = [f"concurrency={self.concurrency}"] if self.concurrency else []
        if self.rate:
            parts.append(f"rate={self.rate}" + (f" burst={self.burst}" if self.burst > 1 else ""))
        return " ".join(parts) or "none"


def limit_setting(route: str) -> str:
    """The setting that holds a route's :class:`RouteLimit` as JSON."""
    return _LIMIT_PREFIX + route


def pause_setting(route: str) -> str:
    """The setting that exists (value ``"1"``) while a route is paused."""
    return _PAUSE_PREFIX + route


def key_tat(limit_key: str) -> str:
    """The name of the stored GCRA time of a limit key."""
    return "k:" + limit_key


def route_tat(route: str) -> str:
    """The name of the stored GCRA time of a route's own rate."""
    return "r:" + route


def route_of_setting(name: str) -> str | None:
    """The route a flow setting belongs to, or None for another setting (stores poke its waiters)."""
    for prefix in (_LIMIT_PREFIX, _PAUSE_PREFIX):
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


def make_route_limit(concurrency: int | None, rate: str | None, burst: int | None) -> RouteLimit | None:
    """Validate ``queue.limit``'s arguments; None when both are None (the route's limit is removed)."""
    count = _check_count("concurrency", concurrency, "queue.limit")
    parsed = None if rate is None else parse_rate(rate)
    steps = _check_count("burst", burst, "queue.limit")
    if steps is not None and parsed is None:
        raise ConfigurationError("queue.limit(burst=...) only means something with a rate.")
    if count is None and parsed is None:
        return None
    return RouteLimit(count, parsed, steps or (default_burst(parsed) if parsed else 1))


# -- what backends must declare before the core lets users rely on it ------------------


def require(store: Persistence, *, priority: bool = False, limit: bool = False, pause: bool = False,
            what: str = "") -> None:
    """ConfigurationError in one line when ``store`` cannot enforce what is asked of it."""
    missing = [(flag, name) for flag, name, asked in (
        ("supports_priorities", "priorities", priority), ("supports_limits", "limits", limit),
        ("supports_pause", "paused routes", pause)) if asked and not getattr(store, flag, False)]
    if missing:
        flag, name = missing[0]
        raise ConfigurationError(f"The {store.name} backend cannot enforce {name} ({flag} is False)"
                                 f"{': ' + what if what else ''}; drop it, or use a backend that declares "
                                 f"{flag}.")


class DeclaredJob(Protocol):
    """What :func:`check_jobs_enforceable` reads of a declared job (a :class:`skunkqueue.job.Job`)."""

    @property
    def name(self) -> str: ...

    @property
    def priority(self) -> int: ...

    @property
    def limit(self) -> Limit | None: ...


def check_jobs_enforceable(store: Persistence, jobs: Iterable[DeclaredJob]) -> None:
    """A pool refuses to serve jobs declared with a limit or priority its store cannot enforce
    (``jobs``: those it will serve, ``trust.declared_on(queue, routes)``)."""
    for job in jobs:
        if job.limit is not None:
            require(store, limit=True, what=f"{job.name} is declared with {job.limit!r}")
        if job.priority:
            require(store, priority=True, what=f"{job.name} is declared with priority={job.priority}")


def route_flow(store: Persistence, route: str) -> tuple[bool, RouteLimit | None]:
    """(paused, limit) of a route as stored; (False, None) on a store without settings."""
    if not store.supports_settings:
        return False, None
    return store.get_setting(pause_setting(route)) is not None, RouteLimit.from_json(
        store.get_setting(limit_setting(route)))


def burst_waits(store: Persistence, route: str, worker_id: str) -> bool:
    """Whether a ``--burst`` worker whose claim found nothing should wait instead of exiting.

    It waits while the route has a due, pending record it may claim. Most are
    held back by a concurrency or rate limit: a finish or the passing of time
    makes them claimable, so "nothing is due" is not true yet. The others were
    passed over by a claim that is a moment old by now: a rate's time came
    since, or a PostgreSQL claim skipped a key whose lock another claim held
    while that claim still counted a slot that a finish has freed since. Those
    are claimable now; counting only what a limit holds back
    (:meth:`Persistence.flow_waiting`), two workers of one pool once both took
    such an empty claim for the end and the pool exited with the job pending.
    A paused route's jobs wait on an operator, and jobs due later on their
    time: neither keeps a burst run alive.
    """
    if not store.supports_limits:
        return False  # nothing is held back, so an empty claim means nothing is due
    if store.supports_pause and route_flow(store, route)[0]:
        return False
    now = store.now()
    for record in store.list_jobs(route=route, state=PENDING, limit=FLOW_SCAN):  # by due
        if record.due > now:
            return False
        if record.target is None or record.target == worker_id:
            return True
    return False


# -- what the monitor and ``skunq limits`` show ------------------------------------------


@dataclass
class RouteFlow:
    """A route's flow state: paused, its own limit, and the due jobs a pause or limit holds back."""

    route: str
    paused: bool
    limit: RouteLimit | None
    waiting: int

    def to_dict(self) -> dict[str, Any]:
        limit = self.limit
        return {"route": self.route, "paused": self.paused, "waiting": self.waiting,
                "concurrency": limit.concurrency if limit else None,
                "rate": str(limit.rate) if limit and limit.rate else None,
                "burst": limit.burst if limit and limit.rate else None}


def describe(store: Persistence, routes: Sequence[str] | None = None) -> dict[str, RouteFlow]:
    """:class:`RouteFlow` per route: ``routes``, else every route with jobs or workers."""
    if routes is None:
        found = {route for route, _ in store.counts()} | {w.route for w in store.workers()}
        routes = sorted(found)
    flows = {}
    for route in routes:
        paused, limit = route_flow(store, route)
        flows[route] = RouteFlow(route, paused, limit, store.flow_waiting(route))
    return flows


def count_waiting(store: Persistence, route: str) -> int:
    """:meth:`Persistence.flow_waiting` from the route's records, as any store can read them."""
    now = store.now()
    due = [r for r in store.list_jobs(route=route, state=PENDING, limit=FLOW_SCAN) if r.due <= now]
    if not due:
        return 0
    paused, limit = route_flow(store, route)
    if paused:
        return len(due)
    running = [r for r in store.list_jobs(route=route, state=RUNNING, limit=FLOW_SCAN)
               if r.lease_until is not None and r.lease_until > now]
    if limit is not None and limit.concurrency is not None and len(running) >= limit.concurrency:
        return len(due)
    held: dict[str, int] = {}
    for record in running:
        if record.limit_key is not None:
            held[record.limit_key] = held.get(record.limit_key, 0) + 1
    keys = {r.limit_key for r in due if r.limit_key is not None and r.limit_interval}
    times = store.rate_times([key_tat(k) for k in keys]) if keys else {}
    waiting = 0
    for record in due:
        key = record.limit_key
        if key is None:
            continue
        full = record.limit_concurrency is not None and held.get(key, 0) >= record.limit_concurrency
        slow = bool(record.limit_interval) and not gcra(times.get(key_tat(key)), now, record.limit_interval or 0.0,
                                                      record.limit_burst or 1)[0]
        waiting += full or slow
    return waiting
