"""Load for the failover and network tests: producers firing, pools working, all into one history.

:class:`Load` starts ``skunq work`` pools (child processes that import
``history_jobs``) and producer threads (``fire`` and ``afire``), each fire a
``step`` job whose starts and ends its worker appends to the run's
:mod:`history`. The producers write ``invoke``/``ok``/``fail`` there; the test
adds ``crash`` and ``kill`` when it does those. :meth:`Load.report` runs the checker.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

from history import History, Report, check, load

from skunkqueue.queue import SkunkQueue
from skunkqueue.testing.kit import BackendUnderTest
from skunkqueue.testing.suite_support import Producer
from skunkqueue.testing.workers import PoolProcess

HERE = Path(__file__).resolve().parent


@dataclass
class ProducerStats:
    api: str
    # (token, monotonic when fire was called): a fire called after a primary died cannot have been
    # acknowledged by it, whereas the moment the reply was noted may come after a death it preceded.
    acked: list[tuple[str, float]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (token, exception type)


class Load:
    """Pools and producers on ``backend``'s queue ``queue``; everything they do goes into ``tmp/history.jsonl``."""

    def __init__(self, backend: BackendUnderTest, queue: str, tmp: Path, *, route: str = "h",
                 pause: float = 0.05, lease: float = 30.0, apis: Sequence[str] = ("sync", "async"),
                 every: float = 0.002, producer_backend: BackendUnderTest | None = None,
                 delayed: int = 0, delay: float = 1.5) -> None:
        self.backend = backend
        self.queue_name = queue
        self.tmp = tmp
        self.route = route
        self.pause = pause
        self.lease = lease
        self.every = every
        # Every ``delayed``-th fire (0: none) is a fire_at ``delay`` seconds ahead, with its due time in
        # the history: the checker's "early" check then has something to catch (a pool whose clock
        # runs ahead, deciding what is due by its own clock, would start those early).
        self.delayed = delayed
        self.delay = delay
        self.history = History(tmp / "history.jsonl")
        self.pools: list[PoolProcess] = []
        self.stats = {api: ProducerStats(api) for api in apis}
        self._producer_backend = producer_backend or backend
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._queues: list[SkunkQueue] = []

    # -- pools -------------------------------------------------------------------------

    def start_pool(self, *, concurrency: int = 2, on: BackendUnderTest | None = None,
                   extra: Sequence[str] = (), env: dict[str, str] | None = None) -> PoolProcess:
        pool = PoolProcess(on or self.backend, self.queue_name, [self.route], concurrency=concurrency,
                           lease=self.lease, log_path=self.tmp / f"pool-{len(self.pools)}.log",
                           extra=["--path", str(HERE), *extra], imports=["history_jobs"], env=env)
        self.pools.append(pool)
        return pool

    def stop_pools(self) -> None:
        for pool in self.pools:
            pool.stop()

    def pool_logs(self) -> str:
        return "\n".join(f"--- pool {i} (exit {p.process.poll()}):\n{p.log()[-1500:]}"
                         for i, p in enumerate(self.pools))

    # -- producers ---------------------------------------------------------------------

    def start_producers(self) -> None:
        for stats in self.stats.values():
            thread = threading.Thread(target=self._produce, args=(stats,), name=f"producer-{stats.api}",
                                      daemon=True)
            self._threads.append(thread)
            thread.start()

    def _produce(self, stats: ProducerStats) -> None:
        backend = self._producer_backend
        q = SkunkQueue(self.queue_name, backend=backend.name, conn_url=backend.url, dbname=backend.db,
                       **backend.options)
        self._queues.append(q)
        # The job as the workers declare it in history_jobs (same module, function and route).
        import history_jobs

        # Retries: an attempt cut short by a lost lease (a partitioned worker) is retried, not an error.
        step = q.event(routes=[self.route], retries=5)(history_jobs.step.func)
        through = Producer(stats.api)
        history_path = self.history.path
        try:
            n = 0
            while not self._stop.is_set():
                n += 1
                token = f"{stats.api}-{n}"
                later = self.delayed > 0 and n % self.delayed == 0
                # The due time noted before the call: the one the store sets counts from a later now, so
                # a start before this one is early beyond doubt.
                self.history.invoke(token, due=time.time() + self.delay if later else None)
                invoked = time.monotonic()
                try:
                    if later:
                        handle = through.fire_at(step, timedelta(seconds=self.delay), history_path, token,
                                                 self.pause)
                    else:
                        handle = through.fire(step, history_path, token, self.pause)
                except Exception as exc:
                    # Not acknowledged: it may or may not have been written. Anything but one of
                    # SkunkQueue's errors is counted (unexpected_errors) and fails the test.
                    self.history.fail(token, f"{type(exc).__name__}: {exc}")
                    stats.refused.append((token, type(exc).__name__))
                    time.sleep(0.05)
                    continue
                self.history.ok(token, handle.id)
                stats.acked.append((token, invoked))
                time.sleep(self.every)
        finally:
            through.close()

    def stop_producers(self, timeout: float = 30.0) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.1))
        if not any(thread.is_alive() for thread in self._threads):
            for q in self._queues:
                q.close()
        # else: a producer hangs in its store's client (a daemon thread, left behind); the test that
        # saw it stuck has already failed, and closing a client under a live call could hang too.

    def acked_since(self, since: float) -> int:
        """The fewest fires called after monotonic ``since`` and acknowledged, of any one producer."""
        return min(sum(1 for _, t in s.acked if t > since) for s in self.stats.values())

    def wait_acked(self, n: int, since: float = 0.0, timeout: float = 60.0, what: str = "") -> None:
        """Until every producer has ``n`` fires acknowledged after ``since``."""
        deadline = time.monotonic() + timeout
        while self.acked_since(since) < n:
            if time.monotonic() > deadline:
                refused = {api: s.refused[-3:] for api, s in self.stats.items()}
                raise AssertionError(f"producers stuck {what}: {self.acked_since(since)} of {n} acknowledged; "
                                     f"last refused {refused}\n{self.pool_logs()}")
            time.sleep(0.02)

    def kill_latest(self, n: int) -> int:
        """``kill`` the ``n`` jobs acknowledged last (likely still pending); each kill that returned goes
        into the history. Returns how many returned (one refused during a failover is not counted)."""
        backend = self._producer_backend
        q = SkunkQueue(self.queue_name, backend=backend.name, conn_url=backend.url, dbname=backend.db,
                       **backend.options)
        acked = sorted((t, tok) for s in self.stats.values() for tok, t in s.acked)[-n:]
        ids = {e["token"]: e["id"] for e in load(self.history.path) if e["op"] == "ok"}
        killed = 0
        try:
            for _, token in acked:
                try:
                    state = q.kill(ids[token])
                except Exception as exc:
                    # Not acknowledged: the job may or may not have been killed (so may or may not run).
                    self.history.write("kill-fail", id=ids[token], error=f"{type(exc).__name__}: {exc}"[:200])
                    continue
                # kill() said running: the attempt claimed then may still begin, and is interrupted.
                record = q.persistence.get(ids[token]) if state == "running" else None
                self.history.kill(ids[token], state, record.token if record is not None else None)
                killed += 1
        finally:
            q.close()
        return killed

    def unexpected_errors(self) -> list[tuple[str, str]]:
        """Refused fires whose exception was not one of SkunkQueue's (each one is a defect)."""
        import skunkqueue.errors as errors

        ours = {name for name in dir(errors) if isinstance(getattr(errors, name), type)}
        return [(token, kind) for s in self.stats.values() for token, kind in s.refused if kind not in ours]

    # -- the history -------------------------------------------------------------------

    def drain(self, timeout: float = 90.0, since: float | None = None) -> None:
        """Until every acknowledged job (fired after monotonic ``since``, if given) returned or was killed."""
        deadline = time.monotonic() + timeout
        tokens = None if since is None else {tok for s in self.stats.values() for tok, t in s.acked if t > since}
        while True:
            events = load(self.history.path)
            acked = {e["id"] for e in events if e["op"] == "ok" and (tokens is None or e["token"] in tokens)}
            ended = {e["id"] for e in events if e["op"] in ("end", "kill", "kill-fail")}
            missing = acked - ended
            if not missing:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(missing)} acknowledged jobs never returned, e.g. "
                                     f"{sorted(missing)[:3]}\n{check(events).explain()}\n{self.pool_logs()}")
            time.sleep(0.2)

    def report(self, **options: Any) -> Report:
        return check(load(self.history.path), **options)

    def close(self, timeout: float = 30.0) -> None:
        self.stop_producers(timeout)
        self.stop_pools()
