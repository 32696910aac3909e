"""The WorkerPool: starts the worker processes, owns their leases and time limits, relays signals.

The pool runs no job code, so it stays responsive whatever a job does. For
every worker it keeps the table of jobs the worker claimed (the worker reports
them through a pipe, see :mod:`skunkqueue.channel`) and, on the worker's behalf:

* renews their leases and sends the worker's heartbeats, so neither depends on
  the job's thread getting the GIL;
* enforces time limits: at ``timeout`` it asks the worker to interrupt the
  job; at ``timeout + grace`` it kills the worker, records the attempt as a
  ``TimeoutError`` and starts a fresh worker;
* acts on kill requests and lost leases the same way (interrupt, then kill);
* hands back prefetched jobs that were not started soon after their claim,
  without charging them an attempt;
* when a worker dies, settles its jobs at once instead of waiting for their
  leases: the running one is charged an attempt, the held ones go back.

Signals. Gentle (SIGHUP, SIGABRT, SIGQUIT, SIGTERM) become SIGTERM to every
worker: each finishes its job, unregisters, and the pool exits 0. SIGINT is
rough: the workers interrupt their jobs (state ``killed``); a worker still
running after ``grace`` seconds, or at a second SIGINT, is killed and its job
recorded ``killed``; the pool exits 130. A SIGINT during a gentle stop makes
it rough. Handlers only set flags: the main loop acts on them.

SIGKILL cannot be handled, so nothing relies on it being handled: on Linux
the workers ask the kernel to kill them when the pool dies (PR_SET_PDEATHSIG).
Their jobs' leases then run out and any pool started later hands those jobs
out again; dead workers are reaped from the registry when their heartbeats stop.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import Callable, TypeVar

from skunkqueue import channel, flow, interpreter, metrics, periodic, policy, signature_policy, signing
from skunkqueue.channel import Reason, StopMode
from skunkqueue.errors import (
    ConfigurationError,
    JobKilled,
    KillRequested,
    LeaseLost,
    RoughStop,
    SkunkQueueError,
    TimeLimit,
)
from skunkqueue.housekeeping import delete_expired_results, reap_dead_workers, recover_expired_leases
from skunkqueue.persistence import Persistence
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import RUNNING, LeaseStatus, WorkerInfo
from skunkqueue.worker import (
    EXIT_DRAINED,
    EXIT_RECYCLE,
    EXIT_UNREACHABLE,
    GENTLE_SIGNALS,
    INTERRUPT_SIGNAL,
    ROUGH_SIGNAL,
    WorkerConfig,
)

log = logging.getLogger("skunkqueue.pool")
T = TypeVar("T")

EXIT_ROUGH = 130
RESTART_BACKOFF_MAX = 30.0
DEFAULT_GRACE = 5.0        # seconds an interrupted job gets before its worker is killed
HEARTBEAT_EVERY = 2.0      # seconds between registry heartbeats
HOUSEKEEPING_EVERY = 1.0   # seconds between recoveries of expired leases
CLOCK_CHECK_EVERY = 60.0   # seconds between comparisons of this host's clock with peers' (FoundationDB)
TICK = 0.05                # longest sleep of the pool's loop
# A held job the worker has not started this long after its claim goes back to
# the queue. The margin over channel.START_WITHIN (after which the worker will
# not start it) absorbs the time for the worker's "start" line to be read.
HAND_BACK_AFTER = channel.START_WITHIN + 0.5


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _stopped(pid: int) -> bool:
    """True if the process is stopped (SIGSTOP, a debugger): its leases must not be renewed."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


@dataclass
class _Claim:
    token: int
    timeout: float            # seconds, 0: no limit
    claimed_at: float         # time.monotonic()
    started_at: float | None = None
    interrupt: tuple[JobKilled, float] | None = None  # the worker was asked to stop it (why, when)


@dataclass
class _Child:
    """One worker process and what the pool knows of it."""

    config: WorkerConfig
    process: subprocess.Popen[bytes] | None = None
    pipes: channel.PoolEnd | None = None
    worker_id: str | None = None
    claims: dict[str, _Claim] = field(default_factory=dict)  # held and running jobs
    # Jobs it started and then gave up on without an outcome ("d ID lost"): the store may
    # still hold them under its token, so they are never taken for claims it did not report.
    gave_up: dict[str, _Claim] = field(default_factory=dict)
    killed_for: JobKilled | None = None   # the pool SIGKILLed it for this reason...
    killed_job: str | None = None         # ...which concerns this job (None: all it ran)
    settled: bool = True                  # the dead process's jobs were dealt with
    started: float = 0.0
    backoff: float = 0.5
    restart_at: float = 0.0
    told_never_start: set[str] = field(default_factory=set)
    drained: bool = False                 # --burst: it found no due job and exited; not restarted

    def start(self) -> None:
        self.pipes = channel.PoolEnd()
        events_fd, control_fd, pulse_fd = self.pipes.child_fds()
        config = replace(self.config, events_fd=events_fd, control_fd=control_fd, pulse_fd=pulse_fd)
        self.process = subprocess.Popen(
            interpreter.command("skunkqueue.worker_main", config.to_json()),
            preexec_fn=_die_with_parent, pass_fds=(events_fd, control_fd, pulse_fd),
        )
        self.pipes.after_spawn()
        self.worker_id, self.killed_for, self.killed_job = None, None, None
        self.claims, self.told_never_start, self.gave_up = {}, set(), {}
        self.settled = False
        self.started = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def running(self) -> dict[str, _Claim]:
        """The jobs it started and has not finished (several for async jobs)."""
        return {job_id: c for job_id, c in self.claims.items() if c.started_at is not None}

    def kill(self, why: JobKilled, job_id: str | None = None) -> None:
        if self.alive and self.process is not None:
            self.killed_for, self.killed_job = why, job_id
            self.process.kill()


class WorkerPool:
    """Runs ``concurrency`` worker processes for each route listed (duplicates count)."""

    def __init__(self, base: WorkerConfig, routes: list[str], concurrency: int = 1,
                 grace: float = DEFAULT_GRACE, schedule: bool = True) -> None:
        self.children = [_Child(replace(base, route=route)) for route in routes for _ in range(concurrency)]
        self.config = base
        self.grace = grace
        self.stopping: StopMode | None = None
        self.store: Persistence | None = None
        self._gentle_signal: int | None = None   # set by handlers, acted on by the loop
        self._rough_signals = 0
        self._rough_acted = 0
        self._rough_deadline = 0.0
        self._wakeup_read = -1
        self._next_renew = self._next_heartbeat = self._next_housekeeping = 0.0
        self._next_clock_check = time.monotonic() + CLOCK_CHECK_EVERY  # the first check is at start
        self.tally = metrics.Tally()
        self.run_schedules = schedule
        self.scheduler: periodic.Scheduler | None = None
        self._next_schedule_check = 0.0

    # -- signals: flags only ---------------------------------------------------------

    def _on_gentle(self, signum: int, frame: FrameType | None) -> None:
        if self._gentle_signal is None:
            self._gentle_signal = signum

    def _on_rough(self, signum: int, frame: FrameType | None) -> None:
        self._rough_signals += 1

    def _install_signal_handlers(self) -> None:
        self._wakeup_read, wakeup_write = os.pipe()
        os.set_blocking(self._wakeup_read, False)
        os.set_blocking(wakeup_write, False)
        signal.set_wakeup_fd(wakeup_write, warn_on_full_buffer=False)
        for sig in GENTLE_SIGNALS:
            signal.signal(sig, self._on_gentle)
        signal.signal(ROUGH_SIGNAL, self._on_rough)

    def _act_on_signals(self, now: float) -> None:
        if self._rough_signals > self._rough_acted:
            first = self._rough_acted == 0
            self._rough_acted = self._rough_signals
            if first:
                log.info("pool: SIGINT, stopping workers roughly (a second SIGINT, or %g s, kills them)",
                         self.grace)
                self.stopping = StopMode.ROUGH
                self._rough_deadline = now + self.grace
                self._signal_all(signal.SIGINT)
            else:
                log.warning("pool: second SIGINT, killing the workers")
                self._kill_all()
        elif self._gentle_signal is not None and self.stopping is None:
            log.info("pool: %s, stopping workers gently", signal.Signals(self._gentle_signal).name)
            self.stopping = StopMode.GENTLE
            self._signal_all(signal.SIGTERM)
        if self.stopping == StopMode.ROUGH and now >= self._rough_deadline and any(c.alive for c in self.children):
            log.warning("pool: workers still running %g s after SIGINT; killing them", self.grace)
            self._kill_all()

    def _signal_all(self, sig: int) -> None:
        how = StopMode.ROUGH if sig == signal.SIGINT else StopMode.GENTLE
        for child in self.children:
            if child.alive and child.process is not None:
                if child.pipes is not None:  # also through the pipe: a job may ignore the signal
                    child.pipes.send(channel.Stop(how))
                try:
                    os.kill(child.process.pid, sig)
                except ProcessLookupError:
                    pass

    def _kill_all(self) -> None:
        for child in self.children:
            child.kill(RoughStop("worker stopped roughly (SIGINT) and killed after its grace period"))

    # -- the store -------------------------------------------------------------------

    def check_backend(self) -> None:
        """Fail fast, with the address in the message, if the store is unreachable."""
        self.store = self.config.connect(lambda backend: backend.workers(), "pool")

    def check_clock(self) -> None:
        """Refuse to start when a peer's clock is further from ours than the lease tolerates.

        On a store that stamps leases with hosts' clocks (FoundationDB), a host
        whose clock runs ``d`` seconds ahead sees a renewed lease expire ``d``
        seconds early; renewals every ``r`` seconds keep it safe while
        ``d < lease - r``. Stores with a clock of their own measure nothing.
        A running pool checks again every minute and logs an error (clocks drift).
        """
        problem = self._clock_problem()
        if problem is not None:
            raise ConfigurationError(f"{problem} Synchronise the clocks (NTP) or raise --lease.")

    def _clock_problem(self) -> str | None:
        if self.store is None:
            return None
        offsets = self._store_call("compare clocks with peers", self.store.clock_offsets) or []
        if not offsets:
            return None
        worst = max(offsets, key=abs)
        bound = self.config.lease - self.renew_every
        if abs(worst) > bound:
            return (f"This host's clock is {abs(worst):.1f} s {'behind' if worst > 0 else 'ahead of'} a peer "
                    f"worker's on the {self.store.name} store, which times leases with hosts' clocks: with "
                    f"--lease {self.config.lease:g} they may differ by at most {bound:g} s.")
        if abs(worst) > bound / 2:
            log.warning("pool: this host's clock is %.1f s from a peer worker's; leases stay safe up to %g s",
                        abs(worst), bound)
        return None

    @property
    def renew_every(self) -> float:
        """Seconds between lease renewals."""
        return min(1.0, self.config.lease / 3)

    @staticmethod
    def _store_call(what: str, call: Callable[..., T], *args: object) -> T | None:
        """Call the store; a failure is logged and retried on a later tick, never fatal."""
        try:
            return call(*args)
        except SkunkQueueError as exc:
            log.warning("pool: %s: %s", what, exc)
            return None

    # -- periodic jobs -----------------------------------------------------------------

    def _start_scheduler(self) -> None:
        """Run the schedules declared on this queue by the modules the pool imported (--import)."""
        schedules = periodic.declared(self.config.queue)
        if not schedules or not self.run_schedules or self.store is None or self.config.burst:
            return  # a --burst pool drains the queue; it does not keep time
        store = self.store
        if not (store.supports_keys and store.supports_settings):
            log.warning("pool: the %s backend lacks idempotency keys or settings, which periodic jobs need; "
                        "%d schedule(s) not run", store.name, len(schedules))
            return
        # This pool's connection; what the records carry (retention, serializer, queue type,
        # retries...) comes from each job's declaration (Job.on).
        here = SkunkQueue(self.config.queue, backend=self.config.backend, conn_url=self.config.url,
                          dbname=self.config.db, **self.config.options)
        self.scheduler = periodic.Scheduler(store, schedules, lambda schedule: schedule.job.on(here))
        log.info("pool: running %d schedule(s): %s", len(schedules),
                 ", ".join(f"{s.name} ({s.spec})" for s in schedules))

    # -- the loop --------------------------------------------------------------------

    def run(self) -> int:
        """Start the workers and supervise them until a signal stops the pool."""
        self._install_signal_handlers()
        signing.verify_keys_from_env()  # SKUNQ_SECRET_PREVIOUS without SKUNQ_SECRET fails here, in one line
        self.check_backend()
        self.check_clock()
        if self.store is not None:  # a limit or priority the store would ignore: refuse, in one line
            flow.check_jobs_enforceable(self.store, self.config.queue, sorted({c.config.route for c in self.children}))
        if self.store is not None:  # tell producers what the workers refuse, so they learn it at fire
            self._store_call("publish the signing policy", signature_policy.publish, self.store)
        if self.store is not None:
            for warning in self._store_call("ask the store about durability", self.store.durability_warnings) or []:
                log.warning("pool: %s", warning)
        self._start_scheduler()
        for child in self.children:
            child.start()
        log.info("pool %d: started %d worker(s)", os.getpid(), len(self.children))
        try:
            while True:
                now = time.monotonic()
                self._act_on_signals(now)
                alive = 0
                for child in self.children:
                    self._read_events(child)
                    alive += self._supervise(child, now)
                if self.stopping and alive == 0:
                    break
                if self.config.burst and all(c.drained for c in self.children):
                    log.info("pool: --burst: no due job left on %s; exiting",
                             " ".join(sorted({c.config.route for c in self.children})))
                    break
                for child in self.children:
                    self._enforce(child, now)
                self._upkeep(now)
                self._sleep(TICK)
        finally:
            for child in self.children:
                if child.pipes is not None:
                    child.pipes.close()
            if self.store is not None:
                self._flush_stats(self.store)
                self.store.close()
        # Signals still on their way (a terminal's burst) must not turn the exit status into 143.
        for sig in (*GENTLE_SIGNALS, ROUGH_SIGNAL):
            signal.signal(sig, signal.SIG_IGN)
        log.info("pool %d: all workers stopped", os.getpid())
        return EXIT_ROUGH if self.stopping == StopMode.ROUGH else 0

    def _sleep(self, seconds: float) -> None:
        select.select([self._wakeup_read], [], [], seconds)
        try:
            os.read(self._wakeup_read, 4096)
        except BlockingIOError:
            pass

    def _read_events(self, child: _Child) -> None:
        if child.pipes is None:
            return
        for event in child.pipes.events():
            if isinstance(event, channel.Hello):
                child.worker_id = event.worker_id
            elif isinstance(event, channel.Claimed):
                child.claims[event.job_id] = _Claim(event.token, event.timeout, event.at)
            elif isinstance(event, channel.Starting):
                claim = child.claims.get(event.job_id)
                if claim is not None:
                    claim.started_at = event.at
            elif isinstance(event, channel.Done):
                self.tally.add(child.config.route, event.state, event.seconds)
                claim = child.claims.pop(event.job_id, None)
                if claim is not None and event.state == channel.Reason.LOST.value:
                    child.gave_up[event.job_id] = claim
            else:  # HandBack
                claim = child.claims.get(event.job_id)
                if claim is not None:
                    claim.started_at = None
                    self._hand_back(child, event.job_id)

    def _supervise(self, child: _Child, now: float) -> int:
        """1 if the child is running; settles and restarts a dead child unless the pool is stopping."""
        if child.alive:
            return 1
        process = child.process
        if process is not None and not child.settled:
            self._read_events(child)
            ran_jobs = bool(child.running)
            self._settle(child, process.returncode)
            if process.returncode == EXIT_DRAINED and self.config.burst and not ran_jobs:
                child.drained = True
            if not self.stopping and not child.drained:
                self._schedule_restart(child, process.returncode, now, ran_jobs)
            child.process = None
        if self.stopping or child.drained:
            return 0
        if child.process is None and now >= child.restart_at:
            child.start()
            return 1
        return 0

    def _schedule_restart(self, child: _Child, code: int | None, now: float, ran_jobs: bool) -> None:
        if child.killed_for is not None:
            child.restart_at = now  # the pool killed it on purpose: replace it at once
            return
        if code == EXIT_RECYCLE:  # it finished its share (--max-jobs/--max-memory-per-child): a fresh one
            log.info("pool: worker for route %s recycled; starting a fresh one", child.config.route)
            child.restart_at = now
            return
        if ran_jobs:
            # A job took it down (its attempt is charged, and capped): replace it
            # at once, or a few poison jobs would leave the route without a worker.
            log.error("pool: worker for route %s died running a job (status %s); restarting",
                      child.config.route, code)
            child.restart_at = now
            return
        if code == EXIT_UNREACHABLE:
            log.error("pool: a worker for route %s could not reach the backend", child.config.route)
        else:
            log.error("pool: worker for route %s exited with status %s; restarting", child.config.route, code)
        if now - child.started > 60:
            child.backoff = 0.5
        child.restart_at = now + child.backoff
        child.backoff = min(child.backoff * 2, RESTART_BACKOFF_MAX)

    def _settle(self, child: _Child, code: int | None) -> None:
        """A worker process is gone: record its running job's attempt, hand back the rest."""
        child.settled = True
        if child.pipes is not None:
            child.pipes.close()
            child.pipes = None
        started = {job_id: claim.token for job_id, claim in {**child.gave_up, **child.claims}.items()
                   if claim.started_at is not None}
        for job_id, claim in list(child.claims.items()):
            if claim.started_at is None:
                self._hand_back(child, job_id)
            else:
                self._record_death(child, job_id, claim, code)
        child.claims, child.gave_up = {}, {}
        if child.worker_id is not None and self.store is not None:
            self._hand_back_unreported(self.store, child.worker_id, started, code)
            self._store_call("unregister a dead worker", self.store.unregister_worker, child.worker_id)

    def _hand_back_unreported(self, store: Persistence, worker_id: str, started: dict[str, int],
                              code: int | None) -> None:
        """A worker killed between a claim and its report leaves jobs only the store knows of.

        It never started them (it reports a claim before starting anything), so they
        go back uncharged now instead of waiting out their lease. A job it did start
        and left running in the store (``started``: id -> token; it gave up on the job
        when the pool fell silent, or a lease-lost interrupt recorded nothing) is not
        one of them: handed back uncharged it would run again on the same attempt.
        """
        running = self._store_call("list running jobs",
                                   lambda: store.list_jobs(state=RUNNING, limit=100_000)) or []
        for record in running:
            if record.owner != worker_id:
                continue
            if started.get(record.id) == record.token:
                outcome = policy.worker_died(record, "WorkerDied", f"worker {worker_id} exited with status {code} "
                                             "after it had started the job")
            else:
                outcome = policy.release(record)
            self._store_call("hand back a job", store.finish, record.id, record.token, outcome)

    def _record_death(self, child: _Child, job_id: str, claim: _Claim, code: int | None) -> None:
        store = self.store
        if store is None:
            return
        record = self._store_call("read a job", store.get, job_id)
        if record is None or record.state != RUNNING or record.token != claim.token:
            return
        why = child.killed_for if child.killed_job in (None, job_id) else None
        if why is None and claim.interrupt is not None:
            why = claim.interrupt[0]  # it died of the interrupt itself (e.g. the job reset SIGUSR1)
        if why is not None:
            outcome = policy.interrupted(record, why)
            outcome = outcome.ending(record) if outcome is not None else None
        else:
            outcome = policy.worker_died(record, "WorkerDied",
                                         f"worker {child.worker_id} exited with status {code} while running it")
        if outcome is None:
            return
        if self._store_call("record a job's outcome", store.finish, job_id, claim.token, outcome):
            ran = time.monotonic() - claim.started_at if claim.started_at is not None else 0.0
            self.tally.add(child.config.route, outcome.state, ran)
            log.warning("job %s: its worker %s; now %s",
                        job_id, f"was killed ({why.reason})" if why else f"exited with status {code}",
                        outcome.state)

    def _hand_back(self, child: _Child, job_id: str) -> None:
        """Put a claimed job that never started back in the queue, without charging an attempt."""
        claim = child.claims.pop(job_id, None)
        store = self.store
        if claim is None or store is None:
            return
        record = self._store_call("read a job", store.get, job_id)
        if record is not None and record.state == RUNNING and record.token == claim.token:
            self._store_call("hand back a job", store.finish, job_id, claim.token, policy.release(record))

    # -- time limits, kill requests, lost leases -------------------------------------

    def _enforce(self, child: _Child, now: float) -> None:
        if not child.alive:
            return
        for held_id, held in list(child.claims.items()):
            if held.started_at is None and now - held.claimed_at > HAND_BACK_AFTER:
                self._hand_back(child, held_id)  # the worker will not start it any more
        for job_id, claim in child.running.items():
            assert claim.started_at is not None
            if claim.interrupt is None:
                if claim.timeout and now >= claim.started_at + claim.timeout:
                    self._interrupt(child, job_id, Reason.TIME, TimeLimit(
                        f"job exceeded its time limit of {claim.timeout:g} s "
                        f"and did not stop within {self.grace:g} s; its worker was killed"))
                continue
            why, asked = claim.interrupt
            if now >= asked + self.grace:
                log.warning("job %s did not stop within %g s (%s); killing worker %s",
                            job_id, self.grace, why.reason, child.worker_id)
                child.kill(why, job_id)
                return

    def _interrupt(self, child: _Child, job_id: str, reason: Reason, why: JobKilled) -> None:
        claim = child.claims.get(job_id)
        if claim is None or claim.interrupt is not None or child.pipes is None or child.process is None:
            return
        claim.interrupt = (why, time.monotonic())
        child.pipes.send(channel.Interrupt(job_id, reason))
        try:
            os.kill(child.process.pid, INTERRUPT_SIGNAL)
        except ProcessLookupError:
            pass

    # -- leases, heartbeats, housekeeping --------------------------------------------

    def _upkeep(self, now: float) -> None:
        store = self.store
        if store is None:
            return
        if now >= self._next_renew:
            self._next_renew = now + self.renew_every
            for child in self.children:
                self._renew(store, child)
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + HEARTBEAT_EVERY
            for child in self.children:
                self._heartbeat(store, child)
            self._store_call("reap dead workers", reap_dead_workers, store)
            self._flush_stats(store)
        if self.scheduler is not None and not self.stopping and now >= self._next_schedule_check:
            self._next_schedule_check = now + periodic.CHECK_EVERY
            self.scheduler.tick()
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + HOUSEKEEPING_EVERY
            self._store_call("recover expired leases", recover_expired_leases, store)
            self._store_call("delete expired results", delete_expired_results, store)
            self._store_call("release stranded dependents", store.release_stranded)
        if now >= self._next_clock_check:
            self._next_clock_check = now + CLOCK_CHECK_EVERY
            problem = self._clock_problem()
            if problem is not None:
                log.error("pool: %s Jobs may run twice at once until the clocks are synchronised.", problem)

    def _renew(self, store: Persistence, child: _Child) -> None:
        # A stopped worker (SIGSTOP, a debugger) keeps nothing: its leases run
        # out and other workers take its jobs; it is fenced off when it resumes.
        if child.worker_id is None or not child.alive or child.process is None or _stopped(child.process.pid):
            return
        if not child.claims:
            if child.pipes is not None:
                child.pipes.pulse()
            return
        leases = [(job_id, claim.token) for job_id, claim in child.claims.items()]
        statuses = self._store_call("renew leases", store.renew, child.worker_id, leases, self.config.lease)
        if not isinstance(statuses, dict):
            return  # no pulse: a worker that hears none for long stops its jobs
        if child.pipes is not None:
            child.pipes.pulse()
        for job_id, answer in statuses.items():
            claim = child.claims.get(job_id)
            try:
                status = LeaseStatus(answer)
            except ValueError:
                log.error("pool: the %s backend answered %r for the lease of job %s; expected one of %s",
                          store.name, answer, job_id, ", ".join(s.value for s in LeaseStatus))
                continue
            if claim is None or status is LeaseStatus.OK:
                continue
            if claim.started_at is not None:
                if status is LeaseStatus.KILL:
                    self._interrupt(child, job_id, Reason.KILL, KillRequested(
                        "killed by request; the job did not stop, so its worker was killed"))
                else:
                    self._interrupt(child, job_id, Reason.LOST, LeaseLost("lease lost"))
            elif claim.started_at is None and job_id not in child.told_never_start:
                if status is LeaseStatus.LOST:
                    child.claims.pop(job_id, None)  # someone else's now: never start it
                if child.pipes is not None and child.pipes.send(channel.NeverStart(job_id)):
                    child.told_never_start.add(job_id)

    def _flush_stats(self, store: Persistence) -> None:
        if self.tally:
            # On failure this interval's counts are lost: they are statistics, not jobs.
            self._store_call("add throughput counters", store.add_stats, self.tally.drain())

    def _heartbeat(self, store: Persistence, child: _Child) -> None:
        if child.worker_id is None or not child.alive or child.process is None or _stopped(child.process.pid):
            return
        state = "stopping" if self.stopping else ("busy" if child.running else "idle")
        if self._store_call("send a heartbeat", store.heartbeat, child.worker_id, state) is False:
            log.warning("pool: worker %s was presumed dead and reaped; registering it again", child.worker_id)
            self._store_call("register a worker", store.register_worker, WorkerInfo(
                id=child.worker_id, queue=child.config.queue, route=child.config.route,
                host=socket.gethostname(), pid=child.process.pid, state=state,
                concurrency=child.config.async_concurrency))

