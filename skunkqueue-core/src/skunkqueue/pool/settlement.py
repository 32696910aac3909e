"""Settlement: what happens to a dead worker's jobs, at once, instead of when their leases run out.

The supervisor calls :func:`settle` once for every worker process that ended,
after it read the worker's last events. What it guarantees:

* the job the worker was running is charged its attempt, by why it died
  (:mod:`skunkqueue.policy`): if the pool killed the worker, or the worker died of
  the interrupt the pool sent, a kill request or a rough stop ends the job
  ``killed``, a time limit fails the attempt (retried as declared) and a lost
  lease records nothing (the job is another worker's now); any other death is
  ``WorkerDied``, handed out again up to ``MIN_ATTEMPTS_ON_LOST_LEASE`` starts;
* the jobs it held and never started go back to the queue uncharged, and so do
  the jobs it claimed in the store but died before reporting;
* a job it started and gave up on without an outcome (its pool fell silent, or
  it lost the lease) is charged, never handed back uncharged: it would run again
  on the same attempt;
* nothing is written for a job the store no longer holds under the worker's
  token (someone else took it meanwhile); and the worker is unregistered.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from skunkqueue import metrics, policy
from skunkqueue.errors import JobKilled
from skunkqueue.persistence.roles import JobStore, MonitorView, WorkerRegistry
from skunkqueue.pool.children import Child, Claim, store_call
from skunkqueue.record import RUNNING

log = logging.getLogger("skunkqueue.pool")  # one name for the whole pool, as its log always read


class Settling(JobStore, MonitorView, WorkerRegistry, Protocol):
    """What settling a dead worker reads and writes: its records (the job store), the running records
    the store holds under its id (listed as the monitor lists them), and its registration."""


def settle(store: Settling | None, child: Child, code: int | None, tally: metrics.Tally) -> None:
    """A worker process is gone: record its running job's attempt, hand back the rest."""
    child.settled = True
    if child.pipes is not None:
        child.pipes.close()
        child.pipes = None
    started = {job_id: claim.token for job_id, claim in {**child.gave_up, **child.claims}.items()
               if claim.started_at is not None}
    for job_id, claim in list(child.claims.items()):
        if claim.started_at is None:
            child.hand_back(store, job_id)
        else:
            _record_death(store, child, job_id, claim, code, tally)
    child.claims, child.gave_up = {}, {}
    if child.worker_id is not None and store is not None:
        _hand_back_unreported(store, child.worker_id, started, code)
        store_call("unregister a dead worker", store.unregister_worker, child.worker_id)


def _hand_back_unreported(store: Settling, worker_id: str, started: dict[str, int], code: int | None) -> None:
    """A worker killed between a claim and its report leaves jobs only the store knows of.

    It never started them (it reports a claim before starting anything), so they
    go back uncharged now instead of waiting out their lease. A job it did start
    and left running in the store (``started``: id -> token; it gave up on the job
    when the pool fell silent, or a lease-lost interrupt recorded nothing) is not
    one of them: handed back uncharged it would run again on the same attempt.
    """
    running = store_call("list running jobs", lambda: store.list_jobs(state=RUNNING, limit=100_000)) or []
    for record in running:
        if record.owner != worker_id:
            continue
        if started.get(record.id) == record.token:
            outcome = policy.worker_died(record, "WorkerDied", f"worker {worker_id} exited with status {code} "
                                         "after it had started the job")
        else:
            outcome = policy.release(record)
        store_call("hand back a job", store.finish, record.id, record.token, outcome)


def _record_death(store: JobStore | None, child: Child, job_id: str, claim: Claim, code: int | None,
                  tally: metrics.Tally) -> None:
    if store is None:
        return
    record = store_call("read a job", store.get, job_id)
    if record is None or record.state != RUNNING or record.token != claim.token:
        return
    why: JobKilled | None = child.killed_for if child.killed_job in (None, job_id) else None
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
    if store_call("record a job's outcome", store.finish, job_id, claim.token, outcome):
        ran = time.monotonic() - claim.started_at if claim.started_at is not None else 0.0
        tally.add(child.config.route, outcome.state, ran)
        log.warning("job %s: its worker %s; now %s",
                    job_id, f"was killed ({why.reason})" if why else f"exited with status {code}",
                    outcome.state)
