"""The pool's scheduler: fires the slots of the periodic jobs its imported modules declared.

What it guarantees:

* a pool runs the schedules declared on its queue by the modules it imported
  (``--import``), unless it was started with ``--no-schedule`` or ``--burst`` (a
  burst pool drains the queue, it does not keep time), or its store lacks the
  idempotency keys and settings that make a slot one record however many pools
  race for it (then it says so once, in a warning, and runs none);
* while the pool runs, and not once it is stopping, the due slots are fired every
  :data:`skunkqueue.periodic.CHECK_EVERY` seconds (:class:`skunkqueue.periodic.Scheduler`
  decides which slots are due, on the store's clock, and keeps each slot once).

It fires through the one callable it is given (:data:`skunkqueue.periodic.Enqueue`),
so it needs no queue of its own: what a slot's record carries (retention,
serializer, retries...) is the job's declaration's business, not the scheduler's.
"""

from __future__ import annotations

import logging

from skunkqueue import periodic
from skunkqueue.persistence import Persistence
from skunkqueue.worker import WorkerConfig

log = logging.getLogger("skunkqueue.pool")  # one name for the whole pool, as its log always read


def schedules_to_run(config: WorkerConfig, store: Persistence) -> list[periodic.Schedule]:
    """The schedules this pool runs: those declared on its queue by the modules it imported, if it may.

    It takes the whole backend: whether it has keys and settings is read from its class
    (``Persistence.supports_keys``/``supports_settings``), which no single role carries."""
    schedules = periodic.declared(config.queue)
    if not schedules or config.burst:
        return []  # a --burst pool drains the queue; it does not keep time
    if not (store.supports_keys and store.supports_settings):
        log.warning("pool: the %s backend lacks idempotency keys or settings, which periodic jobs need; "
                    "%d schedule(s) not run", store.name, len(schedules))
        return []
    return schedules


class Scheduler:
    """Checks the schedules for due slots every ``periodic.CHECK_EVERY`` seconds and fires them."""

    def __init__(self, store: periodic.ScheduleStore, schedules: list[periodic.Schedule],
                 enqueue: periodic.Enqueue) -> None:
        self.slots = periodic.Scheduler(store, schedules, enqueue)
        self._next_check = 0.0
        log.info("pool: running %d schedule(s): %s", len(schedules),
                 ", ".join(f"{s.name} ({s.spec})" for s in schedules))

    def tick(self, now: float, stopping: bool) -> None:
        if not stopping and now >= self._next_check:
            self._next_check = now + periodic.CHECK_EVERY
            self.slots.tick()
