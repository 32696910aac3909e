"""A worker: one process that takes the jobs of one route and runs them, one at a time.

The job runs in the worker's main thread, and the worker has no other thread:
its pool renews the leases of the jobs it holds, sends its heartbeats,
watches its time limits and kill requests, and tells it through a pipe when
to interrupt a job (see :mod:`skunkqueue.channel`). The pool follows up with
SIGUSR1, whose handler raises a :class:`~skunkqueue.errors.JobKilled` inside
the job; if the job never lets it (it holds the GIL in C code, or swallows
``BaseException``), the pool kills the process and records the outcome.

Signals (sent by the WorkerPool, or to the whole process group by a terminal):
SIGTERM, SIGHUP, SIGQUIT, SIGABRT: gentle - finish the current job, then stop.
SIGINT: rough - interrupt the current job (state ``killed``), then stop.
Handlers only set flags (or raise into the job): they take no lock and log
nothing, so a second signal arriving during the first cannot hang the worker.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any, Callable

from skunkqueue import (
    channel,
    dependencies,
    flow,
    headers,
    hooks,
    interpreter,
    logformat,
    policy,
    serializer,
    signing,
    trust,
)
from skunkqueue.backends import open_backend
from skunkqueue.context import JobContext
from skunkqueue.context import _current as _current_job
from skunkqueue.errors import (
    BackendUnavailable,
    JobKilled,
    JobRefused,
    KillRequested,
    LeaseLost,
    PayloadTooLarge,
    RoughStop,
    SerializationError,
    SkunkQueueError,
    TimeLimit,
)
from skunkqueue.job import Job, resolve
from skunkqueue.persistence import Persistence
from skunkqueue.prefetch import Prefetch
from skunkqueue.record import COMPLETE, ERROR, KILLED, JobRecord, Outcome, WorkerInfo

log = logging.getLogger("skunkqueue.worker")

try:  # the C function signal.getsignal wraps; the same answer without the enum conversion
    from _signal import getsignal as _getsignal
except ImportError:  # pragma: no cover - another Python implementation
    _getsignal = signal.getsignal

GENTLE_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGABRT)
ROUGH_SIGNAL = signal.SIGINT
INTERRUPT_SIGNAL = signal.SIGUSR1  # pool -> worker: read the control pipe
EXIT_UNREACHABLE = 3               # exit status: the backend could not be reached at start-up
EXIT_RECYCLE = 4                   # exit status: done its --max-jobs/--max-memory-per-child share; replace it
EXIT_DRAINED = 5                   # exit status (--burst): its route has no due job left
_EXIT_FOR = {"recycle": EXIT_RECYCLE, "drained": EXIT_DRAINED}
WAIT_ROUND = 1.0                   # longest wait for work (s) before the loop looks at its pipe again
POOL_SILENT_PAUSE = 0.2            # seconds between looks at a silent pool before claiming again

Prepared = tuple[Job, list[Any], dict[str, Any]]  # a job ready to run: its function and arguments


@dataclass
class WorkerConfig:
    queue: str
    route: str
    backend: str | None = None
    url: str | None = None
    db: str | None = None
    lease: float = 30.0
    prefetch: int = 0  # jobs claimed per round trip; prefetch.AUTO (0): adapted to the jobs' time
    paths: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    connect_attempts: int = 5
    allow_pickle: bool = False  # run records whose arguments are pickled (trusted stores only)
    async_concurrency: int = 1  # async jobs run at once on the worker's event loop (1: one job at a time)
    imports: list[str] = field(default_factory=list)  # explicit mode: job modules imported at start
    burst: bool = False                 # exit (EXIT_DRAINED) once a claim finds no due job
    max_jobs: int | None = None         # exit (EXIT_RECYCLE) after this many jobs...
    max_memory_mb: float | None = None  # ...or once a job leaves the process this big (resident)
    events_fd: int | None = None   # the pipes to the pool (set by the pool for each process)
    control_fd: int | None = None
    pulse_fd: int | None = None
    # What the pool looked up, so that a worker does not scan the installed distributions again
    # (about 20 ms of a fresh interpreter): the backend's entry point value ("module:attribute")
    # and the plugins' [name, value] pairs. None: look them up.
    entry: str | None = None
    plugins: list[list[str]] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        return cls(**json.loads(text))

    def open(self) -> Persistence:
        return open_backend(self.queue, self.backend, url=self.url, db=self.db, entry=self.entry, **self.options)

    def connect(self, then: Callable[[Persistence], object], who: str) -> Persistence:
        """Open the backend and make one round trip (``then``), retrying with back-off
        ``connect_attempts`` times; a backend may connect lazily, so opening proves nothing."""
        pause = 0.5
        for attempt in range(1, self.connect_attempts + 1):
            try:
                backend = self.open()
                try:
                    then(backend)
                except BaseException:
                    backend.close()
                    raise
                return backend
            except BackendUnavailable as exc:
                if attempt == self.connect_attempts:
                    raise
                log.warning("%s: %s (attempt %d of %d, retrying in %.1f s)",
                            who, exc, attempt, self.connect_attempts, pause)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
        raise AssertionError("unreachable")


def error_info(exc: BaseException, *, with_traceback: bool = True) -> dict[str, str]:
    """Type, message and traceback of an exception, whatever its ``__str__`` does."""
    try:
        message = str(exc)
    except BaseException as broken:  # a job's exception may fail to print itself
        message = f"<{type(exc).__name__} whose message cannot be shown: {type(broken).__name__}>"
    text = ""
    if with_traceback:
        try:
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        except BaseException:
            text = "".join(traceback.format_tb(exc.__traceback__)) + f"{type(exc).__name__}: {message}\n"
    return {"type": type(exc).__name__, "message": message, "traceback": text}


def resident_mb() -> float:
    """This process's resident memory now, in MB (Linux /proc; elsewhere the peak, from getrusage)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1e6 if sys.platform == "darwin" else peak / 1e3


def interrupt_for(reason: channel.Reason, record: JobRecord) -> JobKilled:
    """The exception that stops a job for a reason the pool gave."""
    if reason == channel.Reason.KILL:
        return KillRequested("killed by request")
    if reason == channel.Reason.TIME:
        return TimeLimit(f"job exceeded its time limit of {record.timeout or 0:g} s")
    return LeaseLost("lease lost")


class Worker:
    #: Claim the next jobs in the round trip that records an outcome (see _finish).
    claims_on_finish = True
    claims_on_wake = True  # see Persistence.wait_and_claim

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.id = f"{socket.gethostname()}:{os.getpid()}:{config.route}:{os.urandom(3).hex()}"
        self.info = WorkerInfo(id=self.id, queue=config.queue, route=config.route,
                               host=socket.gethostname(), pid=os.getpid(), concurrency=config.async_concurrency)
        # None, a StopMode (set by signal handlers or the pool), "recycle" or "drained"
        self.stopping: str | None = None
        self.current: JobRecord | None = None
        self.held: list[JobRecord] = []      # claimed, not yet started (prefetch)
        self._claimed_at: dict[str, float] = {}  # job id -> time.monotonic() of its claim
        self._in_job = False                 # the job's own code is running: interrupts may raise
        self._interrupted: JobKilled | None = None  # why the current job was interrupted
        self._never_start: set[str] = set()  # held jobs whose kill was requested
        self._wakeup_read: int | None = None
        self._handlers: dict[signal.Signals, Any] = {}
        self.pool = channel.WorkerEnd(config.events_fd, config.control_fd, config.pulse_fd)
        self._pool_silent = False  # set by the watchdog: the pool stopped renewing our leases
        self._last_pulse = time.monotonic()  # when the watchdog last heard the pool
        self._jobs: dict[str, Job] = {}
        self._dependencies: dict[str, dict[str, str]] = {}  # job id -> its parents' states, for its context
        self._verified: set[str] = set()  # ids of the records whose signature (if any) was checked
        self._refused: set[str] = set()  # functions whose refusal was logged (once each)
        self._done = 0  # jobs run, for --max-jobs-per-child
        self._found_nothing = False  # the last finish_and_claim claimed nothing: no need to look again
        self._prefetch = Prefetch(config.prefetch)
        self.backend: Persistence
        self._parent = os.getppid()

    # -- signals: flags only ---------------------------------------------------------

    def install_signal_handlers(self) -> None:
        # Signals wake the idle wait through this pipe instead of through a lock.
        self._wakeup_read, wakeup_write = os.pipe()
        os.set_blocking(self._wakeup_read, False)
        os.set_blocking(wakeup_write, False)
        signal.set_wakeup_fd(wakeup_write, warn_on_full_buffer=False)
        self._handlers = {**{sig: self._on_gentle for sig in GENTLE_SIGNALS},
                          ROUGH_SIGNAL: self._on_rough, INTERRUPT_SIGNAL: self._on_control}
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)

    def _on_gentle(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping is None:
            self.stopping = channel.StopMode.GENTLE
        self._stop_waiting()

    def _stop_waiting(self) -> None:
        """A flag for the store: a wait for work that polls returns at its next look."""
        backend = getattr(self, "backend", None)  # None until run() connected
        if backend is not None:
            backend.stop_waiting = True

    def _on_rough(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = channel.StopMode.ROUGH
        self._stop_waiting()
        self._stop_tasks(RoughStop("worker stopped roughly (SIGINT)"))
        self._raise_into_job(RoughStop("worker stopped roughly (SIGINT)"))

    def _on_control(self, signum: int, frame: FrameType | None) -> None:
        self._read_commands()

    def _read_commands(self) -> None:
        # Every command is applied before any is raised into the job: a kill of
        # the running job and of a held one can come in the same read.
        stop_current: JobKilled | None = None
        current = self.current
        for command in self.pool.commands():
            if isinstance(command, channel.NeverStart):
                self._never_start.add(command.job_id)
            elif isinstance(command, channel.Stop):
                self.stopping = self.stopping or command.how
                self._stop_waiting()
            elif current is not None and command.job_id == current.id:
                stop_current = stop_current or interrupt_for(command.reason, current)
            else:
                self._stop_task(command.job_id, command.reason)
        if self.stopping == channel.StopMode.ROUGH:
            self._stop_tasks(RoughStop("worker stopped roughly (SIGINT)"))
            stop_current = stop_current or RoughStop("worker stopped roughly (SIGINT)")
        if self._pool_silent:
            silent = LeaseLost("lease lost: the pool stopped renewing it")
            self._stop_tasks(silent)
            stop_current = stop_current or silent
        if stop_current is not None:
            self._raise_into_job(stop_current)

    # Async workers (skunkqueue.async_worker) run jobs as tasks and stop them here.
    def _stop_task(self, job_id: str, reason: channel.Reason) -> None:
        """Stop the task running ``job_id`` for ``reason`` (called from a signal handler)."""

    def _stop_tasks(self, why: JobKilled) -> None:
        """Stop every running task (called from a signal handler)."""

    def _raise_into_job(self, why: JobKilled) -> None:
        """Remember why the current job must stop; raise it if the job's code is running."""
        if self.current is None or self._interrupted is not None:
            return
        self._interrupted = why
        if self._in_job:
            self._in_job = False
            raise why

    # -- lifecycle -----------------------------------------------------------------

    def connect(self) -> Persistence:
        """Open the backend and register, retrying with back-off a bounded number of times."""
        return self.config.connect(lambda backend: backend.register_worker(self.info), f"worker {self.id}")

    def run(self) -> int:
        if self.config.plugins is not None:
            hooks.use_entries(self.config.plugins)
        interpreter.add_roots([os.getcwd(), *self.config.paths])
        trust.import_allowed(self.config.imports)
        self.backend = self.connect()
        self.pool.send(channel.Hello(self.id))
        self._last_pulse = time.monotonic()  # connecting may have taken a while; the pool pulses from now
        self._watch_parent()
        self._watch_pool()
        hooks.call("worker_started", worker=self.info)
        log.info("worker %s: listening on queue %s route %s; store %s", self.id,
                 self.config.queue, self.config.route, self.backend.describe())
        try:
            self._loop()
        finally:
            if self._wakeup_read is not None:
                # No job runs any more, so an interrupt has nothing to stop; and once the
                # interpreter shuts down, CPython puts SIGUSR1 back to its default action,
                # which would kill this process (-10) if the pool's late interrupt came then.
                signal.signal(INTERRUPT_SIGNAL, signal.SIG_IGN)
            self._skip_held()
            self.pool.send(channel.Goodbye(self.id))  # before the registry forgets us (see channel)
            try:
                self.backend.unregister_worker(self.id)
            except SkunkQueueError as exc:
                log.warning("worker %s: could not unregister: %s", self.id, exc)
            hooks.call("worker_stopped", worker=self.info)
            log.info("worker %s: stopped (%s)", self.id, self.stopping or "done")
            self.backend.close()
        return _EXIT_FOR.get(self.stopping or "", 0)

    def _watch_pool(self) -> None:
        """Stop running jobs when the pool falls silent for two thirds of the lease.

        The pool renews our leases; if it is stopped (SIGSTOP, a debugger) or
        cannot reach the store, the leases run out and another worker may take
        the jobs. Stopping first keeps a job from running twice at once.
        """
        if self.config.pulse_fd is None:
            return
        silence = self.config.lease * 2 / 3

        def watch() -> None:
            last = time.monotonic()
            while True:
                # The second look matters: this thread may have waited for the GIL far
                # longer than its timeout while pulses piled up in the pipe.
                if self.pool.wait_pulse(min(0.5, silence / 4)) or self.pool.wait_pulse(0):
                    last, self._pool_silent = time.monotonic(), False
                    self._last_pulse = last
                elif time.monotonic() - last > silence and not self._pool_silent and self._busy():
                    self._pool_silent = True
                    signal.pthread_kill(threading.main_thread().ident or 0, INTERRUPT_SIGNAL)

        threading.Thread(target=watch, name="skunkqueue-pool-watch", daemon=True).start()

    def _busy(self) -> bool:
        return self.current is not None

    def _may_claim_after(self, seconds: float) -> bool:
        """:meth:`may_claim` will still hold ``seconds`` from now, unless the pool speaks first."""
        if self.config.pulse_fd is None:
            return True
        return time.monotonic() + seconds - self._last_pulse <= self.config.lease * 2 / 3

    def may_claim(self) -> bool:
        """False while the pool has been silent for two thirds of the lease.

        Nobody would renew what this worker claimed then (the pool is stopped,
        or cannot reach the store), so its lease would run out and every claim
        would cost the job an attempt without running it.
        """
        if self.config.pulse_fd is None:
            return True
        return time.monotonic() - self._last_pulse <= self.config.lease * 2 / 3

    def _watch_parent(self) -> None:
        """Where PR_SET_PDEATHSIG does not exist, notice a vanished pool within a second."""
        if sys.platform.startswith("linux"):
            return

        def watch() -> None:  # pragma: no cover - not Linux
            while os.getppid() == self._parent:
                time.sleep(1.0)
            os._exit(1)  # the job's lease runs out and another worker takes it

        threading.Thread(target=watch, name="skunkqueue-parent-watch", daemon=True).start()

    def _loop(self) -> None:
        backend = self.backend
        busy_at = time.monotonic()  # when this worker last had work: its back-off grows from there
        while self.stopping is None:
            try:
                self._read_commands()  # a stop the pool also sends through the pipe
                channel.log_unreadable(self.pool.unreadable, f"worker {self.id}")
                if self.stopping is not None:
                    break
                if not self.held and not self.may_claim():
                    self._sleep(POOL_SILENT_PAUSE)
                    continue
                if not self.held and not self._found_nothing:
                    self._took(backend.claim(self.config.route, self.id, self.config.lease,
                                             self._claim_size()))
                self._found_nothing = False
                if not self.held and self.config.burst and not flow.burst_waits(backend, self.config.route, self.id):
                    self.stopping = "drained"  # no due job, none held back by a limit: --burst is done
                    break
                if not self.held:
                    idle = time.monotonic() - busy_at
                    if self.claims_on_wake and backend.claims_on_wake and self._may_claim_after(WAIT_ROUND):
                        # The claim rides on the wait: it runs in the store the moment the wait returns.
                        # A stop meanwhile hands back what it took (the loop looks next, _skip_held).
                        self._took(backend.wait_and_claim(self.config.route, self.id, WAIT_ROUND, idle,
                                                          self.config.lease, self._claim_size()))
                        self._found_nothing = not self.held
                    else:
                        backend.wait_for_work(self.config.route, self.id, WAIT_ROUND, idle)
                    continue
                busy_at = time.monotonic()
                self._take_up(self.held.pop(0))
            except BackendUnavailable as exc:
                log.warning("worker %s: %s; retrying in 1 s", self.id, exc)
                self._sleep(1.0)
        log.info("worker %s: stopping (%s)", self.id, self.stopping)

    def _sleep(self, seconds: float) -> None:
        """Sleep, waking early on any signal (through the wakeup pipe)."""
        if self._wakeup_read is None:
            time.sleep(seconds)
            return
        select.select([self._wakeup_read], [], [], seconds)
        try:
            os.read(self._wakeup_read, 4096)
        except BlockingIOError:
            pass

    def _took(self, claimed: list[JobRecord], *before: channel.Event) -> None:
        """Hold the jobs claimed and tell the pool, after the lines ``before``, in one write."""
        if not claimed:
            self.pool.send(*before)
            return
        now = time.monotonic()
        for record in claimed:
            self._claimed_at[record.id] = now
        self.held.extend(claimed)
        self.pool.send(*before, *(channel.Claimed(now, r.id, r.token, r.timeout or 0) for r in claimed))

    def _take_up(self, record: JobRecord) -> None:
        """Start a held job, unless the pool may already have handed it back or it was killed."""
        if self.stopping is not None:  # a signal came after the loop looked
            self.held.insert(0, record)
            return
        # From here on an interrupt for this job is remembered even before its code runs.
        self.current, self._interrupted = record, None
        # Announce the start before the last checks (see channel.py): a pool
        # that has not read it yet can trust that the job has not started.
        self.pool.send(channel.Starting(time.monotonic(), record.id))
        self._read_commands()
        claimed_at = self._claimed_at.pop(record.id, time.monotonic())
        skip = record.id in self._never_start or time.monotonic() - claimed_at > channel.START_WITHIN
        self._never_start.discard(record.id)
        if skip:
            self.current = None
            log.debug("job %s: killed or held too long since its claim; handing it back", record.id)
            self.pool.send(channel.HandBack(record.id))
        else:
            self.execute(record)

    def _claim_size(self) -> int:
        """Jobs to claim now: --prefetch, or what auto makes of the recent jobs; no more than
        --max-jobs-per-child leaves this worker to run."""
        left = None if self.config.max_jobs is None else self.config.max_jobs - self._done
        return self._prefetch.size(left)

    def _skip_held(self) -> None:
        """The pool hands back the jobs this worker claimed and will not start."""
        held, self.held = self.held, []
        self.pool.send(*(channel.HandBack(r.id) for r in held))

    # -- running one job ----------------------------------------------------------

    def _job(self, record: JobRecord) -> Job:
        # SKUNQ_SECRET (and _PREVIOUS): an unsigned or altered record runs nothing, and imports nothing.
        signing.verify(signing.verify_keys_from_env(), record, accept_unsigned=signing.accepts_unsigned())
        # What the signature vouches for must be where this worker serves, not only self-consistent.
        trust.check_address(record, self.config.queue, self.config.route, self.id)
        job = self._jobs.get(record.func)
        if job is None:
            job = self._jobs[record.func] = resolve(record.func, queue=self.config.queue,
                                                    route=self.config.route, imports=self.config.imports,
                                                    paths=self.config.paths)
        return job

    # -- one attempt: prepare -> run -> outcome -> record ---------------------------------
    # Both workers take every attempt through these steps; the async worker
    # only changes how an async job's code is awaited (as a task, see async_worker).

    def execute(self, record: JobRecord) -> None:
        """One attempt of ``record``, in this thread."""
        started = time.monotonic()
        self._attempt(record, self._begin(record), started)

    def _begin(self, record: JobRecord) -> Any:
        """Make ``record`` current and prepare it (both workers' first step of an attempt)."""
        if self.current is not record:  # called directly, not through _take_up
            self.current, self._interrupted = record, None
        try:
            return self._prepare(record)
        except BaseException:
            self.current = None
            raise

    def _attempt(self, record: JobRecord, prepared: Prepared | Outcome, started: float) -> None:
        """Run what was prepared (unless it is already the outcome), then record the outcome."""
        try:
            outcome = prepared if isinstance(prepared, Outcome) else self._run(record, *prepared)
        finally:
            self.current = None
        self._conclude(record, outcome, started)

    def _conclude(self, record: JobRecord, outcome: Outcome | None, started: float) -> None:
        """Record the attempt's outcome (None: the lease was lost), tell the pool, fire the hooks, log."""
        self._count_done()  # before recording: a worker due for recycling claims nothing with it
        ran = time.monotonic() - started
        self._prefetch.ran(ran)  # before recording: the finish claims the next jobs by it
        if outcome is None:
            hooks.call("job_lost", record=record)
            log.warning("job %s %s route=%s: lease lost, outcome discarded (another worker owns it)",
                        record.id, record.func, record.route,
                        extra=self.job_fields(record, "lost", ran))
            self.pool.send(channel.Done(record.id, channel.Reason.LOST.value, ran))
            return
        outcome = outcome.ending(record)  # the history entry, written by the same finish
        try:
            recorded = self._finish(record, outcome, ran)
        except BackendUnavailable:
            recorded = self._finish_when_back(record, outcome, ran)
        except SkunkQueueError as exc:
            # The store refused this outcome (e.g. a size limit): record why instead.
            outcome = policy.failed(record, error_info(exc, with_traceback=False), retryable=False).ending(record)
            try:
                recorded = self.backend.finish(record.id, record.token, outcome)
                self.pool.send(self._done_event(record, outcome, ran))
            except BackendUnavailable:
                recorded = self._finish_when_back(record, outcome, ran)
        hooks.call("job_finished", record=record, outcome=outcome)
        if outcome.state == ERROR or (outcome.error and outcome.state != KILLED):
            hooks.call("job_failed", record=record, error=outcome.error or {})
        error = outcome.error if outcome.state != COMPLETE and outcome.error else None
        refused = error is not None and error.get("type") == JobRefused.__name__
        log.log(logging.DEBUG if refused else logging.INFO, "job %s %s route=%s %.3fs %s%s%s",
                record.id, record.func, record.route, time.monotonic() - started, outcome.state,
                f" ({error.get('type', '')}: {error.get('message', '')})" if error else "",
                "" if recorded else " (not recorded: lease lost)",
                extra=self.job_fields(record, outcome.state if recorded else "lost", ran, error))
        if error and error.get("traceback"):
            log.debug("job %s traceback:\n%s", record.id, error["traceback"])

    @staticmethod
    def _done_event(record: JobRecord, outcome: Outcome, ran: float) -> channel.Done:
        return channel.Done(record.id, outcome.state, ran)

    def job_fields(self, record: JobRecord, outcome: str, ran: float,
                   error: dict[str, str] | None = None) -> dict[str, Any]:
        """The fields of a job's log line (``--log-format json`` writes them as keys)."""
        fields: dict[str, Any] = {
            "job_id": record.id, "function": record.func, "queue": record.queue, "route": record.route,
            "attempt": record.attempts, "outcome": outcome, "duration": round(ran, 6)}
        if error:
            fields["error_type"] = error.get("type", "")
        # Only from a record this worker verified (its signature, with SKUNQ_SECRET): a forged
        # trace context must not put a job into someone else's trace, not even in the log.
        verified = record.id in self._verified
        self._verified.discard(record.id)  # job_fields is called once per attempt, at its end
        trace = headers.trace_id(record) if verified else None
        if trace:
            fields["trace_id"] = trace
        return {logformat.JOB_FIELDS: fields}

    def _count_done(self) -> None:
        """After a job: stop (to be replaced by the pool) once --max-jobs/--max-memory-per-child is reached."""
        self._done += 1
        why = None
        if self.config.max_jobs is not None and self._done >= self.config.max_jobs:
            why = f"ran {self._done} job(s), --max-jobs-per-child {self.config.max_jobs}"
        elif self.config.max_memory_mb is not None:
            size = resident_mb()
            if size > self.config.max_memory_mb:
                why = f"resident memory {size:.0f} MB over --max-memory-per-child {self.config.max_memory_mb:g}"
        if why is not None and self.stopping is None:
            log.info("worker %s: %s; the pool replaces it", self.id, why)
            self.stopping = "recycle"

    def _finish(self, record: JobRecord, outcome: Outcome, ran: float) -> bool:
        """Record the outcome; with nothing else held, claim the next jobs in the same round trip."""
        done = self._done_event(record, outcome, ran)
        if not self.claims_on_finish or self.held or self.stopping is not None or not self.may_claim():
            recorded = self.backend.finish(record.id, record.token, outcome)
            self.pool.send(done)
            return recorded
        recorded, claimed = self.backend.finish_and_claim(
            record.id, record.token, outcome, self.config.route, self.id, self.config.lease,
            self._claim_size())
        # One pipe write for the outcome and the next claims: the pool reads them together anyway.
        self._took(claimed, done)
        # That claim found nothing: the loop waits for work next instead of asking the store again.
        self._found_nothing = not claimed
        return recorded

    def _finish_when_back(self, record: JobRecord, outcome: Outcome, ran: float) -> bool:
        # The result exists only in this process. The pool keeps renewing the
        # lease until it hears "done", so keep trying for a lease's length.
        deadline = time.monotonic() + self.config.lease
        recorded = False
        while time.monotonic() < deadline:
            self._sleep(0.5)
            try:
                recorded = self.backend.finish(record.id, record.token, outcome)
                break
            except BackendUnavailable as exc:
                log.warning("job %s: cannot record the outcome yet: %s", record.id, exc)
        self.pool.send(self._done_event(record, outcome, ran))
        return recorded

    def _prepare(self, record: JobRecord) -> Prepared | Outcome:
        """The job and its arguments, or the outcome that says why it cannot run."""
        try:
            if record.serializer == "pickle" and not self.config.allow_pickle:
                # The record says how to decode itself, so whoever can write to
                # the store could otherwise make every worker unpickle (run) code.
                raise SerializationError(
                    "This worker does not unpickle job arguments: anyone who can write to the store "
                    "could run code through them. If the store is trusted and the queue uses "
                    "serializer='pickle', start the workers with: skunq work --allow-pickle"
                )
            job = self._job(record)
            self._verified.add(record.id)  # its signature (if any) holds; job_fields takes it out
            args, kwargs = serializer.loads_arguments(headers.arguments(record.payload), record.serializer)
            if record.parents or record.inputs is not None:
                # A workflow step: its parents' results (read from the store) come first.
                try:
                    inputs, self._dependencies[record.id] = dependencies.gather(self.backend, record)
                except BackendUnavailable:
                    return policy.release(record)  # not started: handed back as it was
                if record.inputs is not None:
                    args = [inputs, *args]
        except JobRefused as exc:
            # One warning per function: a producer without the key would otherwise fill the log.
            if record.func not in self._refused:
                self._refused.add(record.func)
                log.warning("worker %s: refusing jobs of %s: %s (further refusals of %s are logged at DEBUG; "
                            "`skunq job ID` shows each)", self.id, record.func, exc, record.func)
            return policy.failed(record, error_info(exc, with_traceback=False), retryable=False)
        except SkunkQueueError as exc:
            return policy.failed(record, error_info(exc, with_traceback=False), retryable=False)
        except BaseException as exc:  # the job's module raised at import
            return policy.failed(record, error_info(exc))
        return job, args, kwargs

    def _run(self, record: JobRecord, job: Job, args: list[Any], kwargs: dict[str, Any]) -> Outcome | None:
        """Run the job in this thread; whatever its code raises becomes the attempt's outcome."""
        hooks.call("job_started", record=record)
        raised: BaseException | None = None
        value: Any = None
        if self.stopping == channel.StopMode.ROUGH:
            self._raise_into_job(RoughStop("worker stopped roughly (SIGINT)"))
        context = _current_job.set(JobContext.of(record, time.time(), self._dependencies.pop(record.id, None)))
        try:
            self._in_job = True
            try:
                if self._interrupted is None:
                    value = job.func(*args, **kwargs)
                    if inspect.iscoroutine(value):  # an async job, one at a time (--async-concurrency 1)
                        import asyncio  # only workers that meet an async job pay for importing it

                        value = asyncio.run(value)
            finally:
                self._in_job = False
                _current_job.reset(context)
        except BaseException as exc:  # sys.exit, KeyboardInterrupt... are the job's
            raised = exc
        self._after_job_code()
        return self._outcome(record, value, raised, self._interrupted)

    def _after_job_code(self) -> None:
        """Undo what a job may have done to the process that the worker depends on."""
        if os.getpid() != self.info.pid:
            os._exit(0)  # a job forked and returned in the child: that child is no worker
        if self._wakeup_read is not None:  # only a worker that installed its own handlers
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            for sig, handler in self._handlers.items():
                # _getsignal, not signal.getsignal: the latter tries to turn every
                # handler into an enum (a raised and caught ValueError for a bound
                # method), 2.6 us each, six times per job.
                if _getsignal(sig) is not handler:
                    signal.signal(sig, handler)
            self._read_commands()  # a stop the job's own handlers may have swallowed

    def _outcome(self, record: JobRecord, value: Any, raised: BaseException | None,
                 interrupted: JobKilled | None) -> Outcome | None:
        # An interrupt decides the outcome even if the job swallowed it.
        if interrupted is not None:
            return policy.interrupted(record, interrupted)
        if raised is not None:
            return policy.failed(record, error_info(raised))
        return self._result(record, value)

    def _result(self, record: JobRecord, value: Any) -> Outcome:
        try:
            data = serializer.dumps(value, record.serializer, what="result")
        except SerializationError as exc:
            return policy.failed(record, error_info(exc, with_traceback=False), retryable=False)
        except Exception as exc:  # e.g. RecursionError on a result nested too deep
            cannot = SerializationError(
                f"Cannot serialize the result of {record.func}: {type(exc).__name__}: {exc}")
            return policy.failed(record, error_info(cannot, with_traceback=False), retryable=False)
        limit = self.backend.max_payload
        if limit is not None and len(data) > limit:
            too_large = PayloadTooLarge(
                f"The result of {record.func} encodes to {len(data)} bytes; the {self.backend.name} "
                f"backend stores at most {limit}. Store large results elsewhere and return a reference."
            )
            return policy.failed(record, error_info(too_large, with_traceback=False), retryable=False)
        return policy.completed(data)
