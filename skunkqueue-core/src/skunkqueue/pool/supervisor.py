"""The supervisor: the pool's worker processes, the signals the pool receives, and the grace it gives.

What it guarantees:

* every worker process runs until the pool stops: one that dies is replaced,
  at once if the pool killed it, it was recycled (``--max-jobs``,
  ``--max-memory-per-child``) or a job took it down, otherwise after a back-off
  that doubles up to :data:`RESTART_BACKOFF_MAX` seconds; under ``--burst`` a
  worker that found no due job is not replaced;
* when a worker dies, its last events are read and its jobs settled at once
  (:mod:`skunkqueue.pool.settlement`) before it is replaced;
* signals. Gentle (SIGHUP, SIGABRT, SIGQUIT, SIGTERM) become SIGTERM to every
  worker: each finishes its job, unregisters, and the pool exits 0. SIGINT is
  rough: the workers interrupt their jobs (state ``killed``); a worker still
  running ``grace`` seconds later, or at a second SIGINT, is killed and its job
  recorded ``killed``; the pool exits :data:`EXIT_ROUGH` (130). A SIGINT during a
  gentle stop makes it rough. The stop is also written into each worker's pipe,
  in case a job swallowed the signal. Handlers only set flags: the pool's loop
  acts on them (:meth:`Supervisor.act_on_signals`), and a signal cuts its sleep short.

SIGKILL cannot be handled, so nothing relies on it being handled: the workers die
with the pool (:func:`skunkqueue.forkserver.die_with_parent`), their jobs'
leases run out and any pool started later hands those jobs out again.
"""

from __future__ import annotations

import logging
import os
import select
import signal
from types import FrameType

from skunkqueue import channel, metrics
from skunkqueue.channel import StopMode
from skunkqueue.errors import RoughStop
from skunkqueue.forkserver import ForkServer, reap_strays
from skunkqueue.persistence.roles import JobStore
from skunkqueue.pool.children import Child, Claim
from skunkqueue.pool.settlement import Settling, settle
from skunkqueue.worker import EXIT_DRAINED, EXIT_RECYCLE, EXIT_UNREACHABLE, GENTLE_SIGNALS, ROUGH_SIGNAL, WorkerConfig

log = logging.getLogger("skunkqueue.pool")  # one name for the whole pool, as its log always read

EXIT_ROUGH = 130
RESTART_BACKOFF_MAX = 30.0
DEFAULT_GRACE = 5.0        # seconds an interrupted job gets before its worker is killed
REAP_EVERY = 5.0           # seconds between looks for orphans the pool adopted (see ForkServer.reap_strays)


class Supervisor:
    """Starts, watches, restarts and stops the pool's worker processes."""

    def __init__(self, children: list[Child], config: WorkerConfig, grace: float, tally: metrics.Tally,
                 forks: ForkServer | None = None) -> None:
        self.children = children
        self.forks = forks  # where workers are forked from; None: fresh interpreters
        self.adopts = forks is not None  # a subreaper (see forkserver.reap_strays), even once the server is gone
        self.config = config
        self.grace = grace
        self.tally = tally  # the outcomes it hears of, or records for a dead worker, are counted here
        self.stopping: StopMode | None = None
        self._gentle_signal: int | None = None   # set by handlers, acted on by the loop
        self._rough_signals = 0
        self._rough_acted = 0
        self._rough_deadline = 0.0
        self._wakeup_read = -1
        self._next_reap = 0.0

    # -- signals: flags only ---------------------------------------------------------

    def _on_gentle(self, signum: int, frame: FrameType | None) -> None:
        if self._gentle_signal is None:
            self._gentle_signal = signum

    def _on_rough(self, signum: int, frame: FrameType | None) -> None:
        self._rough_signals += 1

    def install_signal_handlers(self) -> None:
        self._wakeup_read, wakeup_write = os.pipe()
        os.set_blocking(self._wakeup_read, False)
        os.set_blocking(wakeup_write, False)
        signal.set_wakeup_fd(wakeup_write, warn_on_full_buffer=False)
        for sig in GENTLE_SIGNALS:
            signal.signal(sig, self._on_gentle)
        signal.signal(ROUGH_SIGNAL, self._on_rough)

    def ignore_late_signals(self) -> None:
        """After the stop: signals still on their way (a terminal's burst) must not turn the exit status into 143."""
        for sig in (*GENTLE_SIGNALS, ROUGH_SIGNAL):
            signal.signal(sig, signal.SIG_IGN)

    def sleep(self, seconds: float) -> None:
        """Sleep at most ``seconds``; a signal ends the sleep at once."""
        select.select([self._wakeup_read], [], [], seconds)
        try:
            os.read(self._wakeup_read, 4096)
        except BlockingIOError:
            pass

    def act_on_signals(self, now: float) -> None:
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

    # -- the processes ---------------------------------------------------------------

    def start_all(self) -> None:
        for child in self.children:
            self._start(child)

    def _start(self, child: Child) -> None:
        if not child.start(self.forks):
            self.forks = None  # it failed and is gone: fresh interpreters from now on

    def close(self) -> None:
        """At the pool's exit: the pipes, and the fork server."""
        self.close_pipes()
        if self.forks is not None:
            self.forks.close()
            self.forks = None

    def watch(self, store: Settling | None, now: float) -> int:
        """Hear every worker, settle and restart the dead ones; how many are running."""
        alive = 0
        for child in self.children:
            self._read_events(store, child)
            alive += self._supervise(store, child, now)
        if self.adopts and now >= self._next_reap:
            self._next_reap = now + REAP_EVERY
            known = {c.process.pid for c in self.children if c.process is not None}
            reap_strays(known | ({self.forks.pid} if self.forks is not None else set()))
        return alive

    @property
    def drained(self) -> bool:
        """--burst: every worker found no due job and exited."""
        return all(c.drained for c in self.children)

    def close_pipes(self) -> None:
        for child in self.children:
            if child.pipes is not None:
                child.pipes.close()

    def _read_events(self, store: JobStore | None, child: Child) -> None:
        if child.pipes is None:
            return
        for event in child.pipes.events():
            if isinstance(event, channel.Hello):
                child.worker_id = event.worker_id
            elif isinstance(event, channel.Claimed):
                child.claims[event.job_id] = Claim(event.token, event.timeout, event.at)
            elif isinstance(event, channel.Starting):
                claim = child.claims.get(event.job_id)
                if claim is not None:
                    claim.started_at = event.at
            elif isinstance(event, channel.Done):
                self.tally.add(child.config.route, event.state, event.seconds)
                claim = child.claims.pop(event.job_id, None)
                if claim is not None and event.state == channel.Reason.LOST.value:
                    child.gave_up[event.job_id] = claim
            elif isinstance(event, channel.Goodbye):
                child.leaving = True
            else:  # HandBack
                claim = child.claims.get(event.job_id)
                if claim is not None:
                    claim.started_at = None
                    child.hand_back(store, event.job_id)

    def _supervise(self, store: Settling | None, child: Child, now: float) -> int:
        """1 if the child is running; settles and restarts a dead child unless the pool is stopping."""
        if child.alive:
            return 1
        process = child.process
        if process is not None and not child.settled:
            self._read_events(store, child)
            ran_jobs = bool(child.running)
            settle(store, child, process.returncode, self.tally)
            if process.returncode == EXIT_DRAINED and self.config.burst and not ran_jobs:
                # A job it handed back (held past channel.START_WITHIN) may have gone back to the
                # queue after its last claim looked, so that "nothing due" is not to be trusted:
                # a fresh worker claims it, or finds the queue drained for certain.
                child.drained = not child.handed_back
            if not self.stopping and not child.drained:
                self._schedule_restart(child, process.returncode, now, ran_jobs)
            child.process = None
        if self.stopping or child.drained:
            return 0
        if child.process is None and now >= child.restart_at:
            self._start(child)
            return 1
        return 0

    def _schedule_restart(self, child: Child, code: int | None, now: float, ran_jobs: bool) -> None:
        if child.killed_for is not None:
            child.restart_at = now  # the pool killed it on purpose: replace it at once
            return
        if code == EXIT_DRAINED and child.handed_back:  # --burst, see _supervise
            log.info("pool: --burst: a worker for route %s exited with %d job(s) it handed back; "
                     "starting another to run them", child.config.route, child.handed_back)
            child.restart_at = now
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
