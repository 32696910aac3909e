"""The WorkerPool: ``skunq work``'s process, the parent of the worker processes that run the jobs.

The pool runs no job code, so it stays responsive whatever a job does. It does
four jobs, one module each, composed here; read them in this order:

* :mod:`~skunkqueue.pool.children` - the table they share: one ``Child`` per
  worker process and a ``Claim`` per job it holds (the worker reports its
  claims through a pipe, see :mod:`skunkqueue.channel`);
* :mod:`~skunkqueue.pool.supervisor` - the processes, the signals and the grace:
  starts the workers, replaces a dead one once :mod:`~skunkqueue.pool.settlement`
  has settled its jobs, and turns SIGTERM and friends into a gentle stop (exit 0)
  and SIGINT into a rough one (exit 130);
* :mod:`~skunkqueue.pool.leases` - the lease keeper: renews the leases of the jobs
  the workers hold, enforces time limits, acts on kill requests and lost leases
  (interrupt, then kill after ``grace``), hands back held jobs that never started;
* :mod:`~skunkqueue.pool.upkeep` - heartbeats, housekeeping, throughput stats and
  the check of this host's clock against its peers';
* :mod:`~skunkqueue.pool.scheduler` - the periodic jobs, fired through one enqueue callable.

The pool's loop (:meth:`WorkerPool.run`) wakes every :data:`TICK` seconds, or at
once on a signal, and gives each part its turn. Every part's store call that
fails is a warning, retried at its next turn: only a failure at start is fatal.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

from skunkqueue import flow, metrics, periodic, signature_policy, signing, trust
from skunkqueue.channel import StopMode
from skunkqueue.forkserver import ForkServer
from skunkqueue.persistence import Persistence
from skunkqueue.pool.children import Child, store_call
from skunkqueue.pool.leases import HAND_BACK_AFTER, LeaseKeeper
from skunkqueue.pool.scheduler import Scheduler, schedules_to_run
from skunkqueue.pool.supervisor import DEFAULT_GRACE, EXIT_ROUGH, RESTART_BACKOFF_MAX, Supervisor
from skunkqueue.pool.upkeep import CLOCK_CHECK_EVERY, HEARTBEAT_EVERY, HOUSEKEEPING_EVERY, Upkeep
from skunkqueue.queue import SkunkQueue
from skunkqueue.worker import WorkerConfig

__all__ = ["CLOCK_CHECK_EVERY", "DEFAULT_GRACE", "EXIT_ROUGH", "HAND_BACK_AFTER", "HEARTBEAT_EVERY",
           "HOUSEKEEPING_EVERY", "RESTART_BACKOFF_MAX", "TICK", "WorkerPool"]

log = logging.getLogger("skunkqueue.pool")

TICK = 0.05                # longest sleep of the pool's loop


class WorkerPool:
    """Runs ``concurrency`` worker processes for each route listed (duplicates count).

    ``forks``: a :class:`~skunkqueue.forkserver.ForkServer` to fork the workers from, as
    ``skunq work`` passes; without one each worker starts as a fresh interpreter.
    """

    def __init__(self, base: WorkerConfig, routes: list[str], concurrency: int = 1,
                 grace: float = DEFAULT_GRACE, schedule: bool = True, forks: ForkServer | None = None) -> None:
        self.children = [Child(replace(base, route=route)) for route in routes for _ in range(concurrency)]
        self.config = base
        self.grace = grace
        self.store: Persistence | None = None
        self.tally = metrics.Tally()  # the supervisor counts outcomes into it, the upkeep flushes it
        self.run_schedules = schedule
        # forks: where its workers are forked from (skunq work starts one); None: fresh interpreters
        self.supervisor = Supervisor(self.children, base, grace, self.tally, forks)
        self.leases = LeaseKeeper(base, grace)
        self.upkeep = Upkeep(base, self.tally, self.leases.renew_every)
        self.scheduler: Scheduler | None = None
        self._woken: set[str] = set()  # the stopping workers whose waits were cut short

    @property
    def stopping(self) -> StopMode | None:
        """How the pool is stopping (a signal came), or None while it runs."""
        return self.supervisor.stopping

    @property
    def renew_every(self) -> float:
        """Seconds between lease renewals."""
        return self.leases.renew_every

    def check_backend(self) -> None:
        """Fail fast, with the address in the message, if the store is unreachable."""
        self.store = self.config.connect(lambda backend: backend.workers(), "pool")

    def check_clock(self) -> None:
        """Refuse to start when a peer's clock is further from ours than the lease tolerates
        (see :meth:`Upkeep.check_clock`)."""
        self.upkeep.check_clock(self.store)

    def _start_scheduler(self) -> None:
        """Run the schedules declared on this queue by the modules the pool imported (--import)."""
        if not self.run_schedules or self.store is None:
            return
        schedules = schedules_to_run(self.config, self.store)
        if schedules:
            # This pool's connection; what the records carry (retention, serializer, queue type,
            # retries...) comes from each job's declaration (Job.on).
            here = SkunkQueue(self.config.queue, backend=self.config.backend, conn_url=self.config.url,
                              dbname=self.config.db, **self.config.options)
            self.scheduler = Scheduler(self.store, schedules, periodic.enqueue_on(here))

    def run(self) -> int:
        """Start the workers and supervise them until a signal stops the pool."""
        self.supervisor.install_signal_handlers()
        signing.verify_keys_from_env()  # SKUNQ_SECRET_PREVIOUS without SKUNQ_SECRET fails here, in one line
        self.check_backend()
        self.check_clock()
        if self.store is not None:  # a limit or priority the store would ignore: refuse, in one line
            routes = sorted({c.config.route for c in self.children})
            flow.check_jobs_enforceable(self.store, trust.declared_on(self.config.queue, routes))
        if self.store is not None:  # tell producers what the workers refuse, so they learn it at fire
            store_call("publish the signing policy", signature_policy.publish, self.store)
        if self.store is not None:
            for warning in store_call("ask the store about durability", self.store.durability_warnings) or []:
                log.warning("pool: %s", warning)
        self._start_scheduler()
        self.supervisor.start_all()
        log.info("pool %d: started %d worker(s)", os.getpid(), len(self.children))
        try:
            while True:
                now = time.monotonic()
                self.supervisor.act_on_signals(now)
                alive = self.supervisor.watch(self.store, now)
                if self.stopping:  # after watch: it reads the hellos that name the workers
                    self._wake_workers()
                if self.stopping and alive == 0:
                    break
                if self.config.burst and self.supervisor.drained:
                    log.info("pool: --burst: no due job left on %s; exiting",
                             " ".join(sorted({c.config.route for c in self.children})))
                    break
                for child in self.children:
                    self.leases.enforce(self.store, child, now)
                self._upkeep(now)
                self.supervisor.sleep(TICK)
        finally:
            self.supervisor.close()
            if self.store is not None:
                self.upkeep.flush_stats(self.store)
                self.store.close()
        self.supervisor.ignore_late_signals()
        log.info("pool %d: all workers stopped", os.getpid())
        return EXIT_ROUGH if self.stopping == StopMode.ROUGH else 0

    def _wake_workers(self) -> None:
        """Cut short the stopping workers' waits for work, once each: a worker blocked in the
        store (a Redis BLPOP, up to a second) would notice the stop only when its wait returns."""
        if self.store is None:
            return
        for child in self.children:
            if child.alive and child.worker_id is not None and child.worker_id not in self._woken:
                self._woken.add(child.worker_id)
                store_call("wake a stopping worker", self.store.wake_worker, child.config.route, child.worker_id)

    def _upkeep(self, now: float) -> None:
        """The turns on the store: leases first (they are what keeps a job from running twice)."""
        store = self.store
        if store is None:
            return
        self.leases.tick(store, self.children, now)
        self.upkeep.tick(store, self.children, now, self.stopping is not None)
        if self.scheduler is not None:
            self.scheduler.tick(now, self.stopping is not None)
