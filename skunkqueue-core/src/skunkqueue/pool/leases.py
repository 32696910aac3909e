"""The lease keeper: renews the leases of the jobs the pool's workers hold, and keeps their time.

The pool runs no job code, so none of this depends on a job's thread getting the
GIL. What it guarantees, for every worker that registered and is not stopped:

* every :attr:`LeaseKeeper.renew_every` seconds the leases of all the jobs it
  holds are renewed, and the worker hears a pulse; a worker the store could not
  renew for hears none, and stops its jobs before another worker may take them.
  A stopped process (SIGSTOP, a debugger) keeps nothing: its leases run out;
* time limits: at ``timeout`` the worker is asked to interrupt the job; at
  ``timeout + grace`` the worker is killed (the supervisor records the attempt
  as a ``TimeoutError`` and starts a fresh worker);
* a kill request and a lost lease are acted on the same way (interrupt, then kill);
  a held job either of them concerns is never started;
* a held job not started :data:`HAND_BACK_AFTER` seconds after its claim goes back
  to the queue without being charged an attempt.
"""

from __future__ import annotations

import logging
import os
import time

from skunkqueue import channel
from skunkqueue.channel import Reason
from skunkqueue.errors import JobKilled, KillRequested, LeaseLost, TimeLimit
from skunkqueue.persistence.roles import JobStore
from skunkqueue.pool.children import Child, stopped, store_call
from skunkqueue.record import LeaseStatus
from skunkqueue.worker import INTERRUPT_SIGNAL, WorkerConfig

log = logging.getLogger("skunkqueue.pool")  # one name for the whole pool, as its log always read

# A held job the worker has not started this long after its claim goes back to
# the queue. The margin over channel.START_WITHIN (after which the worker will
# not start it) absorbs the time for the worker's "start" line to be read.
HAND_BACK_AFTER = channel.START_WITHIN + 0.5


class LeaseKeeper:
    """Renews leases and turns time limits, kill requests and lost leases into interrupts and kills."""

    def __init__(self, config: WorkerConfig, grace: float) -> None:
        self.config = config
        self.grace = grace
        self._next_renew = 0.0

    @property
    def renew_every(self) -> float:
        """Seconds between lease renewals."""
        return min(1.0, self.config.lease / 3)

    def tick(self, store: JobStore, children: list[Child], now: float) -> None:
        """Renew every worker's leases when it is time to."""
        if now >= self._next_renew:
            self._next_renew = now + self.renew_every
            for child in children:
                self._renew(store, child)

    def enforce(self, store: JobStore | None, child: Child, now: float) -> None:
        """Hand back the held jobs it will not start; interrupt, then kill, the ones out of time."""
        if not child.alive:
            return
        for held_id, held in list(child.claims.items()):
            if held.started_at is None and now - held.claimed_at > HAND_BACK_AFTER:
                child.hand_back(store, held_id)  # the worker will not start it any more
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

    def _interrupt(self, child: Child, job_id: str, reason: Reason, why: JobKilled) -> None:
        claim = child.claims.get(job_id)
        if claim is None or claim.interrupt is not None or child.pipes is None or child.process is None:
            return
        claim.interrupt = (why, time.monotonic())
        child.pipes.send(channel.Interrupt(job_id, reason))
        try:
            os.kill(child.process.pid, INTERRUPT_SIGNAL)
        except ProcessLookupError:
            pass

    def _renew(self, store: JobStore, child: Child) -> None:
        # A stopped worker (SIGSTOP, a debugger) keeps nothing: its leases run
        # out and other workers take its jobs; it is fenced off when it resumes.
        if child.worker_id is None or not child.alive or child.process is None or stopped(child.process.pid):
            return
        if not child.claims:
            if child.pipes is not None:
                child.pipes.pulse()
            return
        leases = [(job_id, claim.token) for job_id, claim in child.claims.items()]
        statuses = store_call("renew leases", store.renew, child.worker_id, leases, self.config.lease)
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
