"""Jobs (functions made fireable by ``@queue.event``) and the handles ``fire`` returns."""

from __future__ import annotations

import functools
import inspect
import math
import os
import sys
import time
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable, Sequence

from skunkqueue import flow, trust
from skunkqueue.errors import ConfigurationError, InvalidArguments
from skunkqueue.handle import JobHandle, QueueLike, due_time
from skunkqueue.handle import check_finished as _check_finished  # noqa: F401 - its old home, for importers
from skunkqueue.workflow import Signature


def check_name(name: str, what: str) -> str:
    """Queue and route names are stored and sent as UTF-8: refuse what cannot be encoded."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ConfigurationError(
            f"The {what} name {name!r} cannot be encoded as UTF-8 ({exc.reason} at position "
            f"{exc.start}); use printable text."
        ) from None
    return name


def function_name(func: Callable[..., Any]) -> str:
    """``module:qualname`` under which a worker can import ``func``.

    A function defined in the script being run lives in ``__main__``; workers
    know that script by its module name, so that name is used instead.
    """
    module = func.__module__
    if module == "__main__":
        main = sys.modules["__main__"]
        spec = getattr(main, "__spec__", None)
        path: str | None = getattr(main, "__file__", None)
        if spec is not None and spec.name:
            module = spec.name
        elif path:
            module = os.path.splitext(os.path.basename(path))[0]
        else:
            raise ConfigurationError(
                f"{func.__qualname__} is defined interactively; workers can only run jobs "
                "defined in an importable module."
            )
    if "<locals>" in func.__qualname__ or "<lambda>" in func.__qualname__:
        raise ConfigurationError(
            f"{func.__qualname__} is not importable by name; define jobs at module level."
        )
    return f"{module}:{func.__qualname__}"


def resolve(name: str, *, queue: str, route: str, imports: Sequence[str] = (),
            paths: Sequence[str] = ()) -> Job:
    """The Job a worker of ``queue``/``route`` may run for the record function ``name``.

    Only a function declared with ``@queue.event`` on that queue and for that
    route is runnable, and a record never makes the worker import a module
    the operator did not allow: see :mod:`skunkqueue.trust`.
    """
    job = trust.resolve(name, queue, route, imports=imports, paths=paths)
    if not isinstance(job, Job):  # only Job.__init__ declares
        raise TypeError(f"{name!r} was declared as a {type(job).__name__}, not a Job")
    return job


def _positional_range(signature: inspect.Signature) -> tuple[int, int] | None:
    """(required, most) positional arguments, when every parameter is a plain one; else None."""
    params = signature.parameters.values()
    if any(p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params):
        return None
    return sum(p.default is inspect.Parameter.empty for p in params), len(params)


# The longest retention: "keep it" needs no more, and a finished time plus much more is past what the
# stores hold (Redis refuses PEXPIRE beyond 2**63 ms; dates end at year 9999).
MAX_RESULT_TTL = 100 * 365.25 * 24 * 3600


def check_result_ttl(seconds: float) -> None:
    try:
        held = 0 <= seconds <= MAX_RESULT_TTL
    except TypeError:
        held = False
    if not held:
        raise ConfigurationError(f"result_ttl must be a number of seconds from 0 to 100 years "
                                 f"({MAX_RESULT_TTL:.0f}), not {seconds!r}.")


class Job:
    """A function that can be fired onto a queue. Calling it still calls the function."""

    def __init__(self, queue: QueueLike, func: Callable[..., Any], routes: Sequence[str], *,
                 retries: int = 0, retry_backoff: float = 1.0, timeout: float | None = None,
                 result_ttl: float | None = None, priority: int = 0, limit: flow.Limit | None = None) -> None:
        if isinstance(routes, str) or not routes or not all(isinstance(r, str) and r for r in routes):
            raise ConfigurationError("routes must be a non-empty list of route names, e.g. routes=['emails'].")
        for route in routes:
            check_name(route, "route")
        if not (retries >= 0 and 0 <= retry_backoff < math.inf and (timeout is None or 0 < timeout < math.inf)):
            raise ConfigurationError("retries and retry_backoff must be >= 0 and timeout > 0 (finite numbers).")
        if result_ttl is not None:
            check_result_ttl(result_ttl)
        self.result_ttl = result_ttl  # None: the queue's
        self.priority = flow.check_priority(priority)
        if limit is not None and not isinstance(limit, flow.Limit):
            raise ConfigurationError(f"limit= takes a skunkqueue.Limit(...), not {limit!r}.")
        self.limit = limit
        self.queue = queue          # where it is fired (the connection)
        self.declared_on = queue    # whose options its records carry (type, serializer, retention)
        self.func = func
        self.routes = list(routes)
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.timeout = timeout
        self.name = function_name(func)
        self.last: JobHandle | None = None
        # Its periodic.Schedule, set by SkunkQueue.periodic (periodic stands above this module).
        self.schedule: Any = None
        self._signature: inspect.Signature | None = None
        self._positional: tuple[int, int] | None = None  # (required, most) when counting suffices
        functools.update_wrapper(self, func)
        trust.declare(self, queue.name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.func(*args, **kwargs)

    def on(self, queue: QueueLike) -> Job:
        """This job, fired through ``queue``'s connection, with all of its declaration's options:
        its own (retries, back-off, timeout, retention) and its declaring queue's (type,
        serializer, retention). A pool firing a schedule rebuilds the job this way."""
        if queue.name != self.queue.name:
            raise ConfigurationError(f"{self.name} is declared on queue {self.queue.name!r}, not {queue.name!r}.")
        job = Job(queue, self.func, self.routes, retries=self.retries, retry_backoff=self.retry_backoff,
                  timeout=self.timeout, result_ttl=self.result_ttl, priority=self.priority, limit=self.limit)
        job.declared_on = self.declared_on
        job.schedule = self.schedule
        return job

    def __repr__(self) -> str:
        return f"<Job {self.name} routes={self.routes}>"

    def s(self, *args: Any, route: str | None = None, **kwargs: Any) -> Signature:
        """A signature for a workflow (``chain``, ``group``): this job with these arguments, nothing stored.

        ``route`` picks one of the job's routes; a job declared on several needs it.
        """
        return Signature(self, args, kwargs, route)

    def fire(self, *args: Any, key: str | None = None, using: Any = None, after: Sequence[Any] | None = None,
             on_failure: str | None = None, priority: int | None = None, **kwargs: Any) -> JobHandle:
        """Enqueue one run per route, due now.

        With ``key``, the first firing with that key on this queue enqueues;
        a later one, while that job's record exists (pending, running, or
        finished and not yet expired), stores nothing and returns a handle to
        the existing job. ``key`` is therefore not passed to the function.

        With ``using``, the store's own transactional handle of the caller's
        (a psycopg connection on PostgreSQL), the job is stored in that
        handle's open transaction: gone if it rolls back, claimable from its
        commit on (see :meth:`Persistence.enqueue_in`). Not passed to the function either.

        With ``after`` (handles or ids), it runs once all of those jobs finished;
        if one of them failed or was killed it ends ``killed`` without running,
        unless ``on_failure="run"`` (then ``current_job().dependencies`` says
        how each ended). Neither reaches the function.

        ``priority`` overrides the declared one for this run (higher runs first
        within a route; see :mod:`skunkqueue.flow`); not passed to the function.
        """
        return self._fire([(args, kwargs)], time.time(), [key], using, after, on_failure, priority)[0]

    def fire_at(self, when: timedelta | datetime, *args: Any, key: str | None = None, using: Any = None,
                after: Sequence[Any] | None = None, on_failure: str | None = None, priority: int | None = None,
                **kwargs: Any) -> JobHandle:
        """Enqueue one run per route, due after a delay or at an aware datetime (``key``, ``using``,
        ``after``, ``priority``: see fire)."""
        return self._fire([(args, kwargs)], due_time(when), [key], using, after, on_failure, priority)[0]

    def fire_many(self, calls: Iterable[Sequence[Any] | dict[str, Any]], *,
                  keys: Sequence[str | None] | None = None, using: Any = None,
                  priority: int | None = None) -> list[JobHandle]:
        """Enqueue many runs in one round trip: each item is an args tuple or a kwargs dict.

        ``keys``, if given, holds one idempotency key (or None) per call, as ``fire``'s ``key``;
        ``using``, ``priority``: see fire.
        """
        normalized, key_list = self._normalize_many(calls, keys)
        return self._fire(normalized, time.time(), key_list, using, priority=priority)

    @staticmethod
    def _normalize_many(calls: Iterable[Sequence[Any] | dict[str, Any]], keys: Sequence[str | None] | None,
                        ) -> tuple[list[tuple[tuple[Any, ...], dict[str, Any]]], list[str | None] | None]:
        normalized: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        for item in calls:
            if isinstance(item, dict):
                normalized.append(((), dict(item)))
            elif isinstance(item, (tuple, list)):
                normalized.append((tuple(item), {}))
            else:
                normalized.append(((item,), {}))
        if keys is not None and len(keys) != len(normalized):
            raise ConfigurationError(f"fire_many got {len(normalized)} calls but {len(keys)} keys; "
                                     "give one key (or None) per call.")
        return normalized, list(keys) if keys is not None else None

    async def afire(self, *args: Any, key: str | None = None, using: Any = None, after: Sequence[Any] | None = None,
                    on_failure: str | None = None, priority: int | None = None, **kwargs: Any) -> JobHandle:
        """``fire`` for asyncio code: awaits the store without blocking the event loop (no ``using``)."""
        _refuse_async_using(using)
        return (await self._afire([(args, kwargs)], time.time(), [key], after, on_failure, priority))[0]

    async def afire_at(self, when: timedelta | datetime, *args: Any, key: str | None = None, using: Any = None,
                       after: Sequence[Any] | None = None, on_failure: str | None = None,
                       priority: int | None = None, **kwargs: Any) -> JobHandle:
        """``fire_at`` for asyncio code."""
        _refuse_async_using(using)
        return (await self._afire([(args, kwargs)], due_time(when), [key], after, on_failure, priority))[0]

    async def afire_many(self, calls: Iterable[Sequence[Any] | dict[str, Any]], *,
                         keys: Sequence[str | None] | None = None, using: Any = None,
                         priority: int | None = None) -> list[JobHandle]:
        """``fire_many`` for asyncio code."""
        _refuse_async_using(using)
        normalized, key_list = self._normalize_many(calls, keys)
        return await self._afire(normalized, time.time(), key_list, priority=priority)

    async def _afire(self, calls: list[tuple[tuple[Any, ...], dict[str, Any]]], due: float,
                     keys: list[str | None] | None, after: Sequence[Any] | None = None,
                     on_failure: str | None = None, priority: int | None = None) -> list[JobHandle]:
        self._check_priority_name(priority)
        for args, kwargs in calls:
            self.check_arguments(args, kwargs)
        handles = await self.queue._aenqueue(self, calls, due, keys, after, on_failure, priority)
        if handles:
            self.last = handles[-1]
        return handles

    def _check_priority_name(self, priority: int | None) -> None:
        """``fire(priority=)`` is the queue's; a function with a ``priority`` parameter of its own would
        silently lose its argument to it, so that case is refused, saying how to pass it."""
        if priority is None:
            return
        try:
            own = "priority" in inspect.signature(self.func).parameters
        except (TypeError, ValueError):
            own = False
        if own:
            raise ConfigurationError(f"{self.name} has a parameter named priority, and fire(priority=...) sets "
                                     "the job's queue priority: pass your argument positionally, or rename it.")

    def _fire(self, calls: list[tuple[tuple[Any, ...], dict[str, Any]]], due: float,
              keys: list[str | None] | None = None, using: Any = None, after: Sequence[Any] | None = None,
              on_failure: str | None = None, priority: int | None = None) -> list[JobHandle]:
        self._check_priority_name(priority)
        for args, kwargs in calls:
            self.check_arguments(args, kwargs)
        handles = self.queue._enqueue(self, calls, due, keys, using, after, on_failure, priority)
        if handles:
            self.last = handles[-1]
        return handles

    def check_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Refuse, at ``fire``, arguments the function cannot take (not a worker-side TypeError)."""
        if self._signature is None:
            try:
                self._signature = inspect.signature(self.func)
            except (TypeError, ValueError):  # some builtins have no signature: nothing to check
                return
            self._positional = _positional_range(self._signature)
        # Positional arguments to a plain signature are checked by counting: Signature.bind costs
        # ~5 us a call, a sixth of what fire_many spends per job.
        if not kwargs and self._positional and self._positional[0] <= len(args) <= self._positional[1]:
            return
        try:
            self._signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidArguments(
                f"{self.name}{self._signature} cannot take these arguments: {exc}."
            ) from None

    @property
    def state(self) -> str | None:
        """The state of the latest firing (None before the first)."""
        return self.last.state if self.last else None

    @property
    def result(self) -> Any:
        """The result of the latest firing (None until it completes)."""
        return self.last.result if self.last else None


def _refuse_async_using(using: Any) -> None:
    # Reserved, as in fire(): without it, using= would become the job's own argument and fail as an
    # argument the serializer cannot store, far from the cause.
    if using is not None:
        raise ConfigurationError(
            "afire(using=...) is not supported yet: the stores' async clients take no transaction of yours. "
            "Call fire(..., using=handle) from the code that owns the transaction (e.g. in "
            "asyncio.to_thread), or afire after the commit.")
