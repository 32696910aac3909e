"""A worker: one process that takes the jobs of one route and runs them.

The job runs in the main thread. A second thread, the keeper, renews the
job's lease, sends the worker's heartbeat and watches for a kill request, a
time limit or a vanished parent; to interrupt the job it signals the main
thread (SIGUSR1), whose handler raises :class:`JobKilled` inside the job.

Signals (sent by the WorkerPool, or by a terminal's Ctrl-C):
SIGTERM, SIGHUP, SIGQUIT, SIGABRT: gentle — finish the current job, then stop.
SIGINT: rough — interrupt the current job (state ``killed``), then stop.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any

from skunkqueue import hooks, policy, serializer, signing, trust
from skunkqueue.backends import open_backend
from skunkqueue.errors import (
    BackendUnavailable,
    JobKilled,
    PayloadTooLarge,
    SerializationError,
    SkunkQueueError,
)
from skunkqueue.housekeeping import reap_dead_workers, recover_expired_leases
from skunkqueue.job import Job, resolve
from skunkqueue.persistence import LEASE_KILL, LEASE_LOST, Persistence
from skunkqueue.record import ERROR, JobRecord, Outcome, WorkerInfo

log = logging.getLogger("skunkqueue.worker")

GENTLE_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGABRT)
ROUGH_SIGNAL = signal.SIGINT
INTERRUPT_SIGNAL = signal.SIGUSR1  # keeper -> main thread

HEARTBEAT_EVERY = 2.0     # seconds between registry heartbeats
HOUSEKEEPING_EVERY = 1.0  # seconds between lease recoveries
HOLD_WHILE_BUSY = 1.0     # prefetched jobs go back to the queue once the current job runs this long
EXIT_UNREACHABLE = 3      # exit status: the backend could not be reached at start-up


@dataclass
class WorkerConfig:
    queue: str
    route: str
    backend: str | None = None
    url: str | None = None
    db: str | None = None
    lease: float = 30.0
    prefetch: int = 1
    paths: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    connect_attempts: int = 5
    allow_pickle: bool = False  # run records whose arguments are pickled (trusted stores only)
    imports: list[str] = field(default_factory=list)  # explicit mode: job modules imported at start

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        return cls(**json.loads(text))

    def open(self) -> Persistence:
        return open_backend(self.queue, self.backend, url=self.url, db=self.db, **self.options)


def error_info(exc: BaseException, *, with_traceback: bool = True) -> dict[str, str]:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        if with_traceback else "",
    }


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.id = f"{socket.gethostname()}:{os.getpid()}:{config.route}:{os.urandom(3).hex()}"
        self.info = WorkerInfo(id=self.id, queue=config.queue, route=config.route,
                               host=socket.gethostname(), pid=os.getpid())
        self.stopping: str | None = None     # None, "gentle" or "rough"
        self.current: JobRecord | None = None
        self.held: list[JobRecord] = []      # claimed, not yet started (prefetch)
        self._held_lock = threading.Lock()   # the keeper may hand held jobs back
        self._started_at = 0.0               # time.time() when the current job started running
        self._in_job = False
        self._interrupt: str | None = None   # why the keeper wants the job stopped
        self._lease_lost = False
        self._wake = threading.Event()
        self._jobs: dict[str, Job] = {}
        self.backend: Persistence
        self._parent = os.getppid()

    # -- signals ----------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        for sig in GENTLE_SIGNALS:
            signal.signal(sig, self._on_gentle)
        signal.signal(ROUGH_SIGNAL, self._on_rough)
        signal.signal(INTERRUPT_SIGNAL, self._on_interrupt)

    def _on_gentle(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping is None:
            self.stopping = "gentle"
            log.info("worker %s: %s, finishing the current job then stopping",
                     self.id, signal.Signals(signum).name)
        self._wake.set()

    def _on_rough(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = "rough"
        self._wake.set()
        if self._in_job:
            self._in_job = False
            raise JobKilled("worker stopped roughly (SIGINT)")

    def _on_interrupt(self, signum: int, frame: FrameType | None) -> None:
        if self._in_job and self._interrupt:
            self._in_job = False
            raise JobKilled(self._interrupt)

    def interrupt(self, reason: str) -> None:
        """Called from the keeper thread: stop the running job with ``reason``."""
        self._interrupt = reason
        signal.pthread_kill(threading.main_thread().ident or 0, INTERRUPT_SIGNAL)

    # -- lifecycle --------------------------------------------------------------

    def connect(self) -> Persistence:
        """Open the backend, retrying with back-off a bounded number of times."""
        pause = 0.5
        for attempt in range(1, self.config.connect_attempts + 1):
            try:
                backend = self.config.open()
                backend.register_worker(self.info)
                return backend
            except BackendUnavailable as exc:
                if attempt == self.config.connect_attempts:
                    raise
                log.warning("worker %s: %s (attempt %d of %d, retrying in %.1f s)",
                            self.id, exc, attempt, self.config.connect_attempts, pause)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
        raise AssertionError("unreachable")

    def run(self) -> int:
        for path in reversed([os.getcwd(), *self.config.paths]):
            if path not in sys.path:
                sys.path.insert(0, path)
        trust.import_allowed(self.config.imports)
        self.backend = self.connect()
        keeper = threading.Thread(target=self._keeper, name="skunkqueue-keeper", daemon=True)
        keeper.start()
        hooks.call("worker_started", worker=self.info)
        log.info("worker %s: listening on queue %s route %s (%s backend)", self.id,
                 self.config.queue, self.config.route, self.backend.name)
        try:
            self._loop()
        finally:
            self._release_held()
            self._wake.set()
            keeper.join(timeout=5)
            try:
                self.backend.unregister_worker(self.id)
            except SkunkQueueError as exc:
                log.warning("worker %s: could not unregister: %s", self.id, exc)
            hooks.call("worker_stopped", worker=self.info)
            log.info("worker %s: stopped (%s)", self.id, self.stopping or "done")
            self.backend.close()
        return 0

    def _loop(self) -> None:
        backend = self.backend
        pause = 0.001
        next_chores = 0.0
        while self.stopping is None:
            try:
                now = time.time()
                if now >= next_chores:
                    recover_expired_leases(backend, now)
                    next_chores = now + HOUSEKEEPING_EVERY
                if not self.held:
                    self.held = backend.claim(self.config.route, self.id, self.config.lease,
                                              self.config.prefetch)
                if not self.held:
                    if backend.notifies:
                        backend.wait_for_work([self.config.route], self.id, 1.0)
                    else:
                        self._wake.wait(pause)
                        pause = min(pause * 2, backend.max_idle_poll)
                    continue
                pause = 0.001
                with self._held_lock:
                    record = self.held.pop(0) if self.held else None
                if record is not None:
                    self.execute(record)
            except BackendUnavailable as exc:
                log.warning("worker %s: %s; retrying in 1 s", self.id, exc)
                self._wake.wait(1.0)

    def _release_held(self, backend: Persistence | None = None) -> None:
        with self._held_lock:
            held, self.held = self.held, []
        for record in held:
            try:
                (backend or self.backend).finish(record.id, record.token, policy.release(record))
            except SkunkQueueError as exc:
                log.warning("worker %s: could not release job %s (%s); its lease will expire",
                            self.id, record.id, exc)

    # -- running one job ----------------------------------------------------------

    def _job(self, name: str) -> Job:
        if self.current is not None:  # SKUNQ_SECRET: an unsigned or altered record runs nothing
            signing.verify(signing.key_from_env(), self.current)
        job = self._jobs.get(name)
        if job is None:
            job = self._jobs[name] = resolve(name, queue=self.config.queue, route=self.config.route,
                                             imports=self.config.imports, paths=self.config.paths)
        return job

    def execute(self, record: JobRecord) -> None:
        started = time.monotonic()
        self._interrupt, self._lease_lost = None, False
        # A prefetched job may have waited since its claim: its time limit starts now.
        self._started_at = time.time()
        self.current = record
        outcome: Outcome | None
        try:
            outcome = self._run(record)
        finally:
            self.current = None
        if outcome is None:
            log.warning("job %s %s route=%s: lease lost, outcome discarded (another worker owns it)",
                        record.id, record.func, record.route)
            return
        try:
            recorded = self._finish(record, outcome)
        except BackendUnavailable:
            recorded = self._finish_when_back(record, outcome)
        except SkunkQueueError as exc:
            # The store refused this outcome (e.g. a size limit): record why instead.
            outcome = policy.failed(record, error_info(exc, with_traceback=False), retryable=False)
            recorded = self.backend.finish(record.id, record.token, outcome)
        hooks.call("job_finished", record=record, outcome=outcome)
        if outcome.state == ERROR or (outcome.error and outcome.state != "killed"):
            hooks.call("job_failed", record=record, error=outcome.error or {})
        log.info("job %s %s route=%s %.3fs %s%s", record.id, record.func, record.route,
                 time.monotonic() - started, outcome.state,
                 "" if recorded else " (not recorded: lease lost)")

    def _finish(self, record: JobRecord, outcome: Outcome) -> bool:
        """Record the outcome; with nothing else held, claim the next jobs in the same round trip."""
        with self._held_lock:
            claim_next = not self.held and self.stopping is None
        if not claim_next:
            return self.backend.finish(record.id, record.token, outcome)
        recorded, claimed = self.backend.finish_and_claim(
            record.id, record.token, outcome, self.config.route, self.id, self.config.lease,
            self.config.prefetch)
        with self._held_lock:
            self.held.extend(claimed)
        return recorded

    def _finish_when_back(self, record: JobRecord, outcome: Outcome) -> bool:
        # The result exists only in this process: keep trying while the lease
        # could still be valid rather than throwing the work away.
        deadline = time.monotonic() + self.config.lease
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                return self.backend.finish(record.id, record.token, outcome)
            except BackendUnavailable as exc:
                log.warning("job %s: cannot record the outcome yet: %s", record.id, exc)
        return False

    def _run(self, record: JobRecord) -> Outcome | None:
        try:
            if record.serializer == "pickle" and not self.config.allow_pickle:
                # The record says how to decode itself, so whoever can write to
                # the store could otherwise make every worker unpickle (run) code.
                raise SerializationError(
                    "This worker does not unpickle job arguments: anyone who can write to the store "
                    "could run code through them. If the store is trusted and the queue uses "
                    "serializer='pickle', start the workers with: skunq work --allow-pickle"
                )
            job = self._job(record.func)
            args, kwargs = serializer.loads_call(record.payload, record.serializer)
        except SkunkQueueError as exc:
            return policy.failed(record, error_info(exc, with_traceback=False), retryable=False)
        hooks.call("job_started", record=record)
        try:
            self._in_job = True
            try:
                if record.kill_requested:
                    raise JobKilled("killed by request")
                value = job.func(*args, **kwargs)
            finally:
                self._in_job = False
        except JobKilled as exc:
            if self._lease_lost:
                return None
            if self.stopping == "rough" or exc.reason.startswith("killed"):
                return policy.killed(exc.reason)
            error = error_info(TimeoutError(exc.reason), with_traceback=False)
            return policy.failed(record, error)
        except Exception as exc:
            return policy.failed(record, error_info(exc))
        try:
            data = serializer.dumps(value, record.serializer, what="result")
        except SerializationError as exc:
            return policy.failed(record, error_info(exc, with_traceback=False), retryable=False)
        limit = self.backend.max_payload
        if limit is not None and len(data) > limit:
            too_large = PayloadTooLarge(
                f"The result of {record.func} encodes to {len(data)} bytes; the {self.backend.name} "
                f"backend stores at most {limit}. Store large results elsewhere and return a reference."
            )
            return policy.failed(record, error_info(too_large, with_traceback=False), retryable=False)
        return policy.completed(data)

    # -- the keeper thread --------------------------------------------------------

    def _keeper(self) -> None:
        """Renew leases, send heartbeats, enforce time limits; runs until the worker stops."""
        try:
            backend = self.config.open()
        except SkunkQueueError as exc:
            log.error("worker %s: keeper cannot connect: %s", self.id, exc)
            return
        tick = min(1.0, self.config.lease / 3)
        next_heartbeat = next_renew = 0.0
        try:
            while True:
                now = time.monotonic()
                try:
                    if now >= next_heartbeat:
                        self._heartbeat(backend)
                        next_heartbeat = now + HEARTBEAT_EVERY
                    if now >= next_renew:
                        self._renew(backend)
                        next_renew = now + tick
                except BackendUnavailable as exc:
                    log.warning("worker %s: keeper: %s", self.id, exc)
                self._check_time_limit()
                self._hand_back_if_busy(backend)
                if os.getppid() != self._parent:
                    log.error("worker %s: its pool is gone; exiting", self.id)
                    os._exit(1)  # the lease expires and another worker takes the job
                self._wake.wait(self._next_wait(tick))
                if self.stopping and self.current is None:
                    break
        finally:
            backend.close()

    def _next_wait(self, tick: float) -> float:
        current = self.current
        if current is not None and current.timeout:
            left = self._started_at + current.timeout - time.time()
            return max(0.01, min(tick, left))
        if current is not None and self.held:
            return min(tick, HOLD_WHILE_BUSY)
        return tick

    def _check_time_limit(self) -> None:
        current = self.current
        if (current is not None and current.timeout
                and time.time() > self._started_at + current.timeout and self._interrupt is None):
            self.interrupt(f"job exceeded its time limit of {current.timeout:g} s")

    def _hand_back_if_busy(self, backend: Persistence) -> None:
        """Prefetched jobs must not wait behind a long job while other workers are idle."""
        if self.held and self.current is not None and time.time() - self._started_at >= HOLD_WHILE_BUSY:
            self._release_held(backend)

    def _heartbeat(self, backend: Persistence) -> None:
        state = "stopping" if self.stopping else ("busy" if self.current else "idle")
        if not backend.heartbeat(self.id, state):
            log.warning("worker %s: was presumed dead and reaped; registering again", self.id)
            self.info.last_seen = time.time()
            backend.register_worker(self.info)
        reap_dead_workers(backend)

    def _renew(self, backend: Persistence) -> None:
        current = self.current
        leases = [(r.id, r.token) for r in ([current] if current else []) + list(self.held)]
        if not leases:
            return
        statuses = backend.renew(self.id, leases, self.config.lease)
        if current is None or self.current is not current:
            return
        status = statuses.get(current.id)
        if status == LEASE_LOST:
            self._lease_lost = True
            self.interrupt("lease lost")
        elif status == LEASE_KILL and self._interrupt is None:
            self.interrupt("killed by request")


def main(argv: list[str] | None = None) -> int:
    """Entry point of a worker process started by the pool: ``python -m skunkqueue.worker CONFIG``."""
    argv = sys.argv[1:] if argv is None else argv
    config = WorkerConfig.from_json(argv[0])
    logging.basicConfig(level=os.environ.get("SKUNQ_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    worker = Worker(config)
    worker.install_signal_handlers()
    try:
        return worker.run()
    except BackendUnavailable as exc:
        log.error("worker for route %s cannot reach the backend: %s", config.route, exc)
        return EXIT_UNREACHABLE
    except SkunkQueueError as exc:
        log.error("worker for route %s: %s", config.route, exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
