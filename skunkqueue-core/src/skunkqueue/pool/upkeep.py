"""Upkeep: the pool's chores on the store, on behalf of its workers and of every pool sharing the queue.

What it guarantees, while the pool runs:

* every :data:`HEARTBEAT_EVERY` seconds each registered worker that is not stopped
  sends a heartbeat (``idle``, ``busy`` or ``stopping``), and one the others
  reaped as dead meanwhile is registered again; workers whose heartbeats stopped
  (of any pool) are reaped; the throughput counted since the last time is added
  to the store's stats (a failed flush loses counts, never jobs);
* every :data:`HOUSEKEEPING_EVERY` seconds expired leases are recovered, expired
  results deleted and stranded dependents of a workflow released, for every pool;
* the clocks: on a store that times leases with hosts' clocks (FoundationDB) the
  pool refuses to start (:meth:`Upkeep.check_clock`) when a peer's clock is further
  from ours than the lease tolerates, and logs an error if they drift that far
  later (every :data:`CLOCK_CHECK_EVERY` seconds). Other stores measure nothing.

No chore's failure stops the pool: it is one warning, and the chore runs again
at its next turn.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Protocol

from skunkqueue import metrics
from skunkqueue.errors import ConfigurationError
from skunkqueue.housekeeping import Registry, delete_expired_results, reap_dead_workers, recover_expired_leases
from skunkqueue.persistence.roles import Stats, WorkerRegistry, Workflows
from skunkqueue.pool.children import Child, stopped, store_call
from skunkqueue.record import WorkerInfo
from skunkqueue.worker import WorkerConfig

log = logging.getLogger("skunkqueue.pool")  # one name for the whole pool, as its log always read

HEARTBEAT_EVERY = 2.0      # seconds between registry heartbeats
HOUSEKEEPING_EVERY = 1.0   # seconds between recoveries of expired leases
CLOCK_CHECK_EVERY = 60.0   # seconds between comparisons of this host's clock with peers' (FoundationDB)


class Chores(Registry, Workflows, Stats, Protocol):
    """What the chores use: the job store (leases, expiry) and the registry (heartbeats, reaping,
    clocks), workflows' stranded releases, and the stats the tally is flushed to."""


class Upkeep:
    """Heartbeats, housekeeping, stats and clock checks, each on its own period."""

    def __init__(self, config: WorkerConfig, tally: metrics.Tally, renew_every: float) -> None:
        self.config = config
        self.tally = tally           # filled by the supervisor, flushed here
        self.renew_every = renew_every  # the lease keeper's: the clocks may differ by lease - renew_every
        self._next_heartbeat = self._next_housekeeping = 0.0
        self._next_clock_check = time.monotonic() + CLOCK_CHECK_EVERY  # the first check is at start

    def tick(self, store: Chores, children: list[Child], now: float, stopping: bool) -> None:
        """Do the chores that are due."""
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + HEARTBEAT_EVERY
            for child in children:
                self._heartbeat(store, child, stopping)
            store_call("reap dead workers", reap_dead_workers, store)
            self.flush_stats(store)
        if now >= self._next_housekeeping:
            self._next_housekeeping = now + HOUSEKEEPING_EVERY
            store_call("recover expired leases", recover_expired_leases, store)
            store_call("delete expired results", delete_expired_results, store)
            store_call("release stranded dependents", store.release_stranded)
        if now >= self._next_clock_check:
            self._next_clock_check = now + CLOCK_CHECK_EVERY
            problem = self._clock_problem(store)
            if problem is not None:
                log.error("pool: %s Jobs may run twice at once until the clocks are synchronised.", problem)

    def flush_stats(self, store: Stats) -> None:
        if self.tally:
            # On failure this interval's counts are lost: they are statistics, not jobs.
            store_call("add throughput counters", store.add_stats, self.tally.drain())

    def _heartbeat(self, store: WorkerRegistry, child: Child, stopping: bool) -> None:
        if (child.worker_id is None or child.leaving or not child.alive or child.process is None
                or stopped(child.process.pid)):
            return
        state = "stopping" if stopping else ("busy" if child.running else "idle")
        found = store_call("send a heartbeat", store.heartbeat, child.worker_id, state)
        if found is not False:
            child.unregistered = False
        elif not child.unregistered:
            # Gone from the registry: a worker that unregistered itself on its way out (its goodbye
            # not read yet, or from an older version) is dead or has said so by the next round.
            child.unregistered = True
        else:
            child.unregistered = False
            log.warning("pool: worker %s was presumed dead and reaped; registering it again", child.worker_id)
            store_call("register a worker", store.register_worker, WorkerInfo(
                id=child.worker_id, queue=child.config.queue, route=child.config.route,
                host=socket.gethostname(), pid=child.process.pid, state=state,
                concurrency=child.config.async_concurrency))

    # -- the clocks --------------------------------------------------------------------

    def check_clock(self, store: Registry | None) -> None:
        """Refuse to start when a peer's clock is further from ours than the lease tolerates.

        On a store that stamps leases with hosts' clocks (FoundationDB), a host
        whose clock runs ``d`` seconds ahead sees a renewed lease expire ``d``
        seconds early; renewals every ``r`` seconds keep it safe while
        ``d < lease - r``. Stores with a clock of their own measure nothing.
        A running pool checks again every minute and logs an error (clocks drift).
        """
        problem = self._clock_problem(store)
        if problem is not None:
            raise ConfigurationError(f"{problem} Synchronise the clocks (NTP) or raise --lease.")

    def _clock_problem(self, store: Registry | None) -> str | None:
        if store is None:
            return None
        offsets = store_call("compare clocks with peers", store.clock_offsets) or []
        if not offsets:
            return None
        worst = max(offsets, key=abs)
        bound = self.config.lease - self.renew_every
        if abs(worst) > bound:
            return (f"This host's clock is {abs(worst):.1f} s {'behind' if worst > 0 else 'ahead of'} a peer "
                    f"worker's on the {store.name} store, which times leases with hosts' clocks: with "
                    f"--lease {self.config.lease:g} they may differ by at most {bound:g} s.")
        if abs(worst) > bound / 2:
            log.warning("pool: this host's clock is %.1f s from a peer worker's; leases stay safe up to %g s",
                        abs(worst), bound)
        return None
