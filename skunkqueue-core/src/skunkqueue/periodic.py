"""Periodic jobs: a schedule fires an ordinary job once per slot, with any number of schedulers.

``@queue.periodic(every=timedelta(seconds=30), routes=['ticks'])`` or
``@queue.periodic(cron='0 3 * * *', tz='Europe/Berlin', routes=['reports'])``
makes a Job (fireable by hand as any other) and a :class:`Schedule`. Every
``skunq work`` pool that imports the declaring module (``--import``) runs the
schedules of its queue, so running several pools is safe: a slot is fired with
the idempotency key ``"<job name>@<slot time>"``, and the store keeps exactly
one record per key, however many schedulers race for it. The fired job gets
retries, timeouts, dead letters and kill like any other.

Slots are whole microseconds since the epoch (integers: one slot, one key,
whoever reckons it), reckoned on the store's clock (``Persistence.now``), so
that no pool's clock makes a slot early or makes another pool skip one.
Slots are never fired early (a slot is fired once its time has come by the
store's clock, due at that time) and never twice (the key). After downtime
the most recent missed slot is fired if it is at most ``misfire_grace``
seconds old (default 60); older ones are skipped, unless ``catch_up=True``,
which fires every slot missed since the last one fired.

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
from decimal import Decimal
from typing import Callable, Iterator, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from skunkqueue.context import slot_moment
from skunkqueue.errors import ConfigurationError, SkunkQueueError
from skunkqueue.handle import QueueLike
from skunkqueue.job import Job, JobHandle
from skunkqueue.persistence import CLOCK_TOLERANCE
from skunkqueue.persistence.roles import JobStore, Settings

log = logging.getLogger("skunkqueue.periodic")

# Every schedule declared in this process: queue name -> job name -> Schedule.
DECLARED: dict[str, dict[str, Schedule]] = {}

CHECK_EVERY = 0.25     # seconds between a pool's checks for due slots
CATCH_UP_LIMIT = 1000  # slots fired at most per check with catch_up, so a long outage cannot flood


def _zone(tz: str) -> timezone | object:
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(f"Unknown time zone {tz!r}; use an IANA name such as 'Europe/Berlin'.") from None


MICRO = 1_000_000
NEVER_TOO_LATE = 2**62  # microseconds: a grace past any slot since the epoch
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
# Slots are whole microseconds since EPOCH: integers, so that one slot is one
# number (and one key) however it was reached; float seconds are not (1.1 s
# steps reach 53.6 as 53.599999 by one chain of additions and 53.6 by another).


def micros(stamp: float) -> int:
    """Epoch seconds as whole microseconds, rounded down (a time is never taken for a later one)."""
    return math.floor(Decimal(repr(stamp)) * MICRO)


def micros_of(moment: datetime) -> int:
    """An aware datetime as whole microseconds since the epoch, exactly."""
    return (moment - EPOCH) // timedelta(microseconds=1)


def seconds(slot: int) -> float:
    return slot / MICRO


@dataclass
class Schedule:
    """When a periodic job's slots are. Build it with ``SkunkQueue.periodic``.

    Slots are whole microseconds since the Unix epoch (see :func:`micros`):
    ``slots_after`` and ``due_slots`` take and give them.
    """

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
        # A whole number of microseconds: 1.1 (seconds) is 1_100_000, not 1.1 * 10**6 = 1100000.0000000002.
        self.every_us = None if self.every is None else round(Decimal(repr(self.every)) * MICRO)
        if self.every_us is not None and self.every_us < 1:
            raise ConfigurationError("every= must be at least one microsecond.")
        if not self.misfire_grace >= 0:
            raise ConfigurationError("misfire_grace must be >= 0 seconds.")
        # math.inf: however old, the latest missed slot fires.
        self.grace_us = (NEVER_TOO_LATE if math.isinf(self.misfire_grace)
                         else min(round(Decimal(repr(float(self.misfire_grace))) * MICRO), NEVER_TOO_LATE))
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

    def slots_after(self, after: int) -> Iterator[int]:
        """Slot times (epoch microseconds) strictly after ``after`` (epoch microseconds), in order."""
        if self.every_us is not None:
            slot = (after // self.every_us + 1) * self.every_us
            while True:
                yield slot
                slot += self.every_us
        # cronsim works in whole seconds: start from the second holding ``after``.
        for moment in CronSim(self.cron or "", self._moment(after // MICRO)):
            slot = micros_of(moment)
            if slot > after:
                yield slot

    def next_slot(self, after: float) -> float:
        """The first slot after ``after``, both in epoch seconds (for display)."""
        return seconds(next(self.slots_after(micros(after))))

    def due_slots(self, now: int, last: int | None) -> list[int]:
        """The slots to fire at ``now``, given the last slot fired (None: none yet); all in microseconds."""
        if last is not None and self.catch_up:
            slots: list[int] = []
            for slot in self.slots_after(last):
                if slot > now or len(slots) >= CATCH_UP_LIMIT:
                    break
                slots.append(slot)
            return slots
        latest = self.latest_slot(now)
        if latest is None or (last is not None and latest <= last) or now - latest > self.grace_us:
            return []
        return [latest]

    def latest_slot(self, now: int) -> int | None:
        """The latest slot at or before ``now`` (microseconds), found without walking from the past:
        a tiny interval or a long grace would mean millions of steps per check."""
        if self.every_us is not None:
            return now // self.every_us * self.every_us
        # cronsim walks back from the next whole second to two matches before it; the slots are then
        # walked forward from the earlier one, so that the forward rules (daylight saving) decide.
        back = CronSim(self.cron or "", self._moment(now // MICRO + 1), reverse=True)
        try:
            next(back)
            before = micros_of(next(back))
        except (StopIteration, OverflowError, ValueError):  # no match since year 1
            return None
        latest = None
        for slot in self.slots_after(before - 1):
            if slot > now:
                break
            latest = slot
        return latest

    def _moment(self, second: int) -> datetime:
        return (EPOCH + timedelta(seconds=second)).astimezone(self._zone)  # type: ignore[arg-type]

    def key(self, slot: int) -> str:
        if not isinstance(slot, int):  # epoch seconds would name a slot in 1970
            raise TypeError(f"a slot is whole microseconds since the epoch (periodic.micros), not {slot!r}")
        return f"{self.name}@{slot_label(slot)}"


def slot_label(slot: int) -> str:
    """The one text of a slot: UTC, to the millisecond when that is exact (the keys of every
    whole-millisecond slot read as before), else to the microsecond."""
    moment = EPOCH + timedelta(microseconds=slot)
    return moment.isoformat(timespec="milliseconds" if slot % 1000 == 0 else "microseconds")


def slot_of(key: str | None, function: str) -> float | None:
    """The slot a periodic job's key names, in epoch seconds (None for any other key)."""
    moment = slot_moment(key, function)
    return None if moment is None else seconds(micros_of(moment))


def _setting(name: str, what: str) -> str:
    return f"periodic:{name}:{what}"


def last_slot(store: Settings, name: str) -> float | None:
    """The last slot fired (epoch seconds, for display), or None."""
    last = _last_micros(store, name)
    return None if last is None else seconds(last)


def _last_micros(store: Settings, name: str) -> int | None:
    value = store.get_setting(_setting(name, "last"))
    if not value:
        return None
    try:  # written as exact decimal seconds; older versions wrote repr(float), read the same way
        return round(Decimal(value) * MICRO)
    except ArithmeticError:
        log.warning("periodic %s: unreadable last slot %r in the store; taken as none", name, value)
        return None


def _put_last_slot(store: Settings, name: str, slot: int) -> None:
    # Decimal seconds with six places: exact, and a float() to pools of older versions.
    store.put_setting(_setting(name, "last"), f"{slot // MICRO}.{slot % MICRO:06d}")


def is_paused(store: Settings, name: str) -> bool:
    return store.get_setting(_setting(name, "paused")) == "1"


def set_paused(store: Settings, name: str, paused: bool) -> None:
    store.put_setting(_setting(name, "paused"), "1" if paused else None)


# What a scheduler needs of a queue: fire one run of ``schedule``'s job, due at ``due``
# (epoch seconds), under the idempotency key ``key``. See :func:`enqueue_on`.
Enqueue = Callable[[Schedule, float, str], object]


def enqueue_on(queue: QueueLike) -> Enqueue:
    """The :data:`Enqueue` of a pool: each slot's job is its schedule's, fired through ``queue``'s connection
    with all of its declaration's options (:meth:`Job.on`)."""
    def enqueue(schedule: Schedule, due: float, key: str) -> None:
        schedule.job.on(queue)._fire([((), {})], due, [key])
    return enqueue


class ScheduleStore(JobStore, Settings, Protocol):
    """What a scheduler uses of its store: the clock slots are reckoned on (:meth:`JobStore.now`)
    and the settings that keep each schedule's last slot and pause."""


class Scheduler:
    """Fires the slots of a queue's schedules; a pool calls :meth:`tick` about once a second.

    ``enqueue`` fires one slot's job (on the pool's own store, :func:`enqueue_on`).
    Slots are reckoned on the store's clock (``Persistence.now``), so that a
    pool whose clock is off neither fires a slot early nor records a "last
    fired" slot that is still in the future for the others (which would make
    them skip every slot up to it).
    """

    def __init__(self, store: ScheduleStore, schedules: list[Schedule], enqueue: Enqueue) -> None:
        self.store = store
        self.schedules = schedules
        self._enqueue = enqueue

    def tick(self, now: float | None = None) -> int:
        """Fire the due slots; ``now`` (epoch seconds) stands for the store's clock in tests."""
        ahead = 0.0  # how far this host's clock is ahead of the store's
        if now is None:
            try:
                now = self.store.now()
            except SkunkQueueError as exc:
                log.warning("periodic: cannot read the store's clock: %s; trying again at the next check", exc)
                return 0
            ahead = time.time() - now
        # A store keeps a producer's times as given while the clocks agree within CLOCK_TOLERANCE
        # and moves them by the difference beyond it; move them back, so that a slot's job is due
        # at its slot by the store's clock, whatever this host's clock says.
        moved = ahead if abs(ahead) > CLOCK_TOLERANCE else 0.0
        fired = 0
        for schedule in self.schedules:
            try:
                fired += self._check(schedule, micros(now), moved)
            except SkunkQueueError as exc:
                log.warning("periodic %s: %s; trying again at the next check", schedule.name, exc)
            except Exception:  # a schedule's fault must not stop the pool that runs the jobs
                log.exception("periodic %s: the check failed; trying again at the next check", schedule.name)
        return fired

    def _check(self, schedule: Schedule, now: int, moved: float) -> int:
        if is_paused(self.store, schedule.name):
            return 0
        last = _last_micros(self.store, schedule.name)
        slots = schedule.due_slots(now, last)
        if not slots:
            return 0
        for slot in slots:
            # Due at its slot: never early; the key makes a slot one record, whoever fires it.
            self._enqueue(schedule, seconds(slot) + moved, schedule.key(slot))
            log.info("periodic %s: slot %s fired", schedule.name, slot_label(slot))
        if last is None or slots[-1] > last:
            _put_last_slot(self.store, schedule.name, slots[-1])  # <= now: never ahead of the store's clock
        return len(slots)


def fire_now(schedule: Schedule, queue: QueueLike) -> JobHandle:
    """Fire ``schedule``'s job once now on ``queue``, outside its slot sequence (no slot key: it is extra).

    ``skunq periodic run`` and the monitor's "run now" both call this.
    """
    return schedule.job.on(queue).fire()


def every_seconds(every: timedelta | float | int) -> float:
    return every.total_seconds() if isinstance(every, timedelta) else float(every)


def declare(schedule: Schedule) -> None:
    DECLARED.setdefault(schedule.job.queue.name, {})[schedule.name] = schedule


def declared(queue: str) -> list[Schedule]:
    """The schedules declared on ``queue`` by the modules this process imported."""
    return list(DECLARED.get(queue, {}).values())
