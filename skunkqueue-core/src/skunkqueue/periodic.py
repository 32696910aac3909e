"""Periodic jobs: a schedule fires an ordinary job once per slot, with any number of schedulers.

``@queue.periodic(every=timedelta(seconds=30), routes=['ticks'])`` or
``@queue.periodic(cron='0 3 * * *', tz='Europe/Berlin', routes=['reports'])``
makes a Job (fireable by hand as any other) and a :class:`Schedule`. Every
``skunq work`` pool that imports the declaring module (``--import``) runs the
schedules of its queue, so running several pools is safe: a slot is fired with
the idempotency key ``"<job name>@<slot time>"``, and the store keeps exactly
one record per key, however many schedulers race for it. The fired job gets
retries, timeouts, dead letters and kill like any other.

Slots are never fired early (a slot is fired once its time has come, due at
that time) and never twice (the key). After downtime the most recent missed
slot is fired if it is less than ``misfire_grace`` seconds old (default 60);
older ones are skipped, unless ``catch_up=True``, which fires every slot
missed since the last one fired.

Cron expressions are read by cronsim, in the schedule's time zone (``tz``,
default UTC). Across a daylight-saving change a wall-clock time that does not
exist that day (02:30 when clocks jump from 02:00 to 03:00) fires at the first
minute after the gap (03:00); one that occurs twice (when clocks fall back)
fires once, at its first occurrence.

A schedule's state lives in the store (``Persistence.get_setting``): the last
slot fired, and whether it is paused (``skunq periodic pause NAME``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Callable, Iterator

from cronsim import CronSim, CronSimError

from skunkqueue.errors import ConfigurationError, SkunkQueueError

if TYPE_CHECKING:
    from skunkqueue.job import Job, JobHandle
    from skunkqueue.persistence import Persistence
    from skunkqueue.queue import SkunkQueue

log = logging.getLogger("skunkqueue.periodic")

# Every schedule declared in this process: queue name -> job name -> Schedule.
DECLARED: dict[str, dict[str, Schedule]] = {}

CHECK_EVERY = 0.25     # seconds between a pool's checks for due slots
CATCH_UP_LIMIT = 1000  # slots fired at most per check with catch_up, so a long outage cannot flood


def _zone(tz: str) -> timezone | object:
    try:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
    except ImportError as exc:  # pragma: no cover - Python < 3.9
        raise ConfigurationError("Time zones need Python 3.9 or newer.") from exc
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(f"Unknown time zone {tz!r}; use an IANA name such as 'Europe/Berlin'.") from None


@dataclass
class Schedule:
    """When a periodic job's slots are. Build it with ``SkunkQueue.periodic``."""

    job: Job
    every: float | None = None      # seconds; slots at whole multiples of it since the epoch
    cron: str | None = None
    tz: str = "UTC"
    misfire_grace: float = 60.0
    catch_up: bool = False

    def __post_init__(self) -> None:
        if (self.every is None) == (self.cron is None):
            raise ConfigurationError("A periodic job needs exactly one of every=timedelta(...) or cron='...'.")
        if self.every is not None and not (self.every > 0 and math.isfinite(self.every)):
            raise ConfigurationError("every= must be a positive interval, e.g. every=timedelta(seconds=30).")
        if self.misfire_grace < 0:
            raise ConfigurationError("misfire_grace must be >= 0 seconds.")
        self._zone = _zone(self.tz)
        if self.cron is not None:
            try:
                CronSim(self.cron, datetime.now(timezone.utc))
            except CronSimError as exc:
                raise ConfigurationError(f"Cannot read the cron expression {self.cron!r}: {exc}") from None

    @property
    def name(self) -> str:
        return self.job.name

    @property
    def spec(self) -> str:
        if self.every is not None:
            return f"every {self.every:g} s"
        return f"cron '{self.cron}' {self.tz}"

    def slots_after(self, after: float) -> Iterator[float]:
        """Slot times (epoch seconds) strictly after ``after``, in order."""
        if self.every is not None:
            slot = (math.floor(after / self.every) + 1) * self.every
            while True:
                yield slot
                slot += self.every
        start = datetime.fromtimestamp(after, self._zone)  # type: ignore[arg-type]
        for moment in CronSim(self.cron or "", start):
            stamp = moment.timestamp()
            if stamp > after:
                yield stamp

    def next_slot(self, after: float) -> float:
        return next(self.slots_after(after))

    def due_slots(self, now: float, last: float | None) -> list[float]:
        """The slots to fire at ``now``, given the last slot fired (None: none yet)."""
        if last is not None and self.catch_up:
            slots: list[float] = []
            for slot in self.slots_after(last):
                if slot > now or len(slots) >= CATCH_UP_LIMIT:
                    break
                slots.append(slot)
            return slots
        latest = None
        for slot in self.slots_after(max(now - self.misfire_grace, last or -math.inf) - 1e-6):
            if slot > now:
                break
            latest = slot
        if latest is None or (last is not None and latest <= last) or now - latest > self.misfire_grace:
            return []
        return [latest]

    def key(self, slot: float) -> str:
        return f"{self.name}@{slot_label(slot)}"


def slot_label(slot: float) -> str:
    return datetime.fromtimestamp(slot, timezone.utc).isoformat(timespec="milliseconds")


def slot_of(key: str | None, function: str) -> float | None:
    """The slot a periodic job's key names (None for any other key)."""
    if not key or not key.startswith(function + "@"):
        return None
    try:
        return datetime.fromisoformat(key[len(function) + 1:]).timestamp()
    except ValueError:
        return None


def _setting(name: str, what: str) -> str:
    return f"periodic:{name}:{what}"


def last_slot(store: Persistence, name: str) -> float | None:
    value = store.get_setting(_setting(name, "last"))
    return float(value) if value else None


def is_paused(store: Persistence, name: str) -> bool:
    return store.get_setting(_setting(name, "paused")) == "1"


def set_paused(store: Persistence, name: str, paused: bool) -> None:
    store.put_setting(_setting(name, "paused"), "1" if paused else None)


class Scheduler:
    """Fires the slots of a queue's schedules; a pool calls :meth:`tick` about once a second.

    ``bind`` turns a schedule into the Job to fire on the pool's own store.
    """

    def __init__(self, store: Persistence, schedules: list[Schedule], bind: Callable[[Schedule], Job]) -> None:
        self.store = store
        self.schedules = schedules
        self._bind = bind
        self._memory: dict[str, float] = {}  # last slots, for stores that keep no settings

    def tick(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        fired = 0
        for schedule in self.schedules:
            try:
                fired += self._check(schedule, now)
            except SkunkQueueError as exc:
                log.warning("periodic %s: %s; trying again at the next check", schedule.name, exc)
        return fired

    def _check(self, schedule: Schedule, now: float) -> int:
        if is_paused(self.store, schedule.name):
            return 0
        last = last_slot(self.store, schedule.name)
        slots = schedule.due_slots(now, last)
        if not slots:
            return 0
        job = self._bind(schedule)
        for slot in slots:
            # Due at its slot: never early; the key makes a slot one record, whoever fires it.
            job._fire([((), {})], slot, [schedule.key(slot)])
            log.info("periodic %s: slot %s fired", schedule.name, slot_label(slot))
        if last is None or slots[-1] > last:
            self.store.put_setting(_setting(schedule.name, "last"), repr(slots[-1]))
        return len(slots)


def fire_now(schedule: Schedule, queue: SkunkQueue) -> JobHandle:
    """Fire ``schedule``'s job once now on ``queue``, outside its slot sequence (no slot key: it is extra).

    ``skunq periodic run`` and the monitor's "run now" both call this.
    """
    from skunkqueue.job import Job

    job = schedule.job
    return Job(queue, job.func, job.routes, retries=job.retries, retry_backoff=job.retry_backoff,
               timeout=job.timeout).fire()


def every_seconds(every: timedelta | float | int) -> float:
    return every.total_seconds() if isinstance(every, timedelta) else float(every)


def declare(schedule: Schedule) -> None:
    DECLARED.setdefault(schedule.job.queue.name, {})[schedule.name] = schedule


def declared(queue: str) -> list[Schedule]:
    """The schedules declared on ``queue`` by the modules this process imported."""
    return list(DECLARED.get(queue, {}).values())
