"""Chores any worker (or producer) performs so that dead workers never need manual clean-up."""

from __future__ import annotations

import logging
import time
from typing import Protocol

from skunkqueue import policy
from skunkqueue.errors import RecordHeld
from skunkqueue.persistence.roles import JobStore, WorkerRegistry
from skunkqueue.record import WorkerInfo

log = logging.getLogger("skunkqueue.housekeeping")

# A worker that has not sent a heartbeat for this long is presumed dead.
WORKER_TTL = 15.0


class Registry(JobStore, WorkerRegistry, Protocol):
    """What reaping reads and changes: the registry, and the store's clock and broadcasts."""


def recover_expired_leases(backend: JobStore, now: float | None = None) -> int:
    """Hand out again (or dead-letter) every job whose worker stopped renewing its lease."""
    recovered = 0
    for record in backend.expired_leases(time.time() if now is None else now):
        outcome = policy.lease_lost(record)
        # Guarded by the token: a renewal or another recoverer in between wins.
        try:
            finished = backend.finish(record.id, record.token, outcome)
        except RecordHeld as exc:
            # Held for now (MongoDB: a transaction a dead worker left open): the others are
            # recovered now, this one on a later round.
            log.warning("job %s: cannot hand it back yet: %s", record.id, exc)
            continue
        if finished:
            recovered += 1
            log.warning("job %s (%s) lost its lease held by %s: now %s",
                        record.id, record.func, record.owner, outcome.state)
    return recovered


def delete_expired_results(backend: JobStore) -> int:
    """Delete finished records past their ``result_ttl`` (a no-op where the store expires them itself)."""
    return backend.delete_expired(backend.now())


def reap_dead_workers(backend: Registry, ttl: float = WORKER_TTL) -> list[str]:
    """Unregister workers that stopped sending heartbeats, and drop broadcasts meant for them."""
    cutoff = backend.now() - ttl  # last_seen is on the store's clock where it has one
    reaped = []
    for worker in backend.workers():
        if worker.last_seen < cutoff:
            backend.unregister_worker(worker.id)
            dropped = backend.purge(worker.route, target=worker.id)
            log.warning("reaped dead worker %s (pid %s on %s, route %s); dropped %d broadcast(s)",
                        worker.id, worker.pid, worker.host, worker.route, dropped)
            reaped.append(worker.id)
    return reaped


def live_workers(backend: Registry, ttl: float = WORKER_TTL) -> list[WorkerInfo]:
    """The registered workers with a recent heartbeat; the dead ones are reaped on the way."""
    reap_dead_workers(backend, ttl)
    return backend.workers()
