"""Periodic jobs: every slot fires exactly once and never early, with several schedulers, one of
them killed, intervals that are not whole seconds, and a pool whose clock is a minute ahead;
and a schedule's records keep the declaring queue's options."""

from __future__ import annotations

import math
import signal
import time
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Callable

import pytest

from skunkqueue import periodic
from skunkqueue.persistence import CLOCK_TOLERANCE, Persistence
from skunkqueue.record import FINISHED_STATES
from skunkqueue.testing.clocks import skewed
from skunkqueue.testing.kit import BackendUnderTest
from skunkqueue.testing.periodic_runs import TICKS_ENV, Run, read_runs
from skunkqueue.testing.workers import KIT_JOBS, PoolProcess

PERIODIC_JOBS = "skunkqueue.testing.periodic_jobs"
FRACTIONS = "skunkqueue.testing.periodic_fractions"
TWO_SECONDS = "skunkqueue.testing.periodic_two_seconds"
RETENTION = "skunkqueue.testing.periodic_retention"
SKEW = 60.0


def _needs_periodic(store: Persistence) -> None:
    if not (store.supports_keys and store.supports_settings):
        pytest.skip(f"periodic jobs need idempotency keys and settings, which the {store.name} "
                    "backend does not implement yet")


def _us(stamp: float) -> int:
    """Epoch seconds as whole microseconds (rounded down), exactly."""
    return math.floor(Decimal(repr(stamp)) * 1_000_000)


def _slots(every_us: int, after: float, before: float) -> list[float]:
    """The slots of an ``every_us`` schedule strictly inside (after, before), in epoch seconds."""
    first = _us(after) // every_us + 1
    last = (_us(before) - 1) // every_us
    return [k * every_us / 1e6 for k in range(first, last + 1)]


def _check_each_slot_once(runs: list[Run], window: list[float], what: str = "") -> dict[float, list[Run]]:
    by_slot: dict[float, list[Run]] = {}
    for run in runs:  # to 10 ms: two keys a millisecond apart are one slot fired twice
        by_slot.setdefault(round(run.slot, 2), []).append(run)
    missing = [s for s in window if round(s, 2) not in by_slot]
    twice = {s: [(r.started, r.pid) for r in rs] for s, rs in by_slot.items() if len(rs) > 1}
    early = {s: round(min(r.started for r in rs) - s, 3) for s, rs in by_slot.items()
             if min(r.started for r in rs) < s}
    assert len(window) >= 5, f"too few slots to judge {what}: {window}"
    assert not twice, f"{what}slots fired more than once: {twice}"
    assert not early, f"{what}slots run before their time (seconds): {early}"
    assert not missing, f"{what}slots never fired: {missing}"
    return by_slot


class PeriodicSuite:
    """Mixed into :class:`~skunkqueue.testing.ConformanceSuite`."""

    def test_every_slot_fires_once_with_three_schedulers_and_a_crash(
            self, store: Persistence, start_pool: Any, tmp_path: Path) -> None:
        _needs_periodic(store)
        ticks = tmp_path / "ticks"
        env = {TICKS_ENV: str(ticks)}
        imports = [KIT_JOBS, PERIODIC_JOBS]
        pools = [start_pool(["r"], imports=imports, env=env) for _ in range(3)]
        begun = time.time()
        time.sleep(8)
        pools[0].signal(signal.SIGKILL)
        pools[0].wait(10)
        time.sleep(4)
        start_pool(["r"], imports=imports, env=env)
        time.sleep(max(0.0, begun + 20 - time.time()))
        ended = time.time()
        time.sleep(3)  # the last slots' jobs run
        window = [float(s) for s in range(math.ceil(begun + 1), math.floor(ended))]
        assert len(window) >= 15
        _check_each_slot_once(read_runs(ticks), window)

    def test_slots_of_intervals_that_are_not_whole_seconds_fire_once(
            self, store: Persistence, start_pool: Any, tmp_path: Path) -> None:
        """every=1.1 s and 1.3 s, two pools: each slot once, at a whole multiple of the interval."""
        _needs_periodic(store)
        ticks = tmp_path / "ticks"
        pools = [start_pool(["r"], imports=[KIT_JOBS, FRACTIONS], env={TICKS_ENV: str(ticks)}) for _ in range(2)]
        begun = time.time()
        time.sleep(15)
        ended = time.time()
        time.sleep(3)
        for pool in pools:
            pool.stop()
        runs = read_runs(ticks)
        for function, every_us in (("eleven_tenths", 1_100_000), ("thirteen_tenths", 1_300_000)):
            mine = [r for r in runs if r.function.endswith(":" + function)]
            # From the first check on: the first check fires the latest slot (within the grace) at once.
            _check_each_slot_once(mine, _slots(every_us, begun, ended), f"every {every_us / 1e6:g} s: ")
            assert all(_us(r.slot + 5e-7) % every_us == 0 for r in mine), [r.slot for r in mine]

    def test_a_pool_whose_clock_is_a_minute_ahead_fires_nothing_early_and_skips_nothing(
            self, store: Persistence, backend: BackendUnderTest, queue_name: str, start_pool: Any,
            tmp_path: Path) -> None:
        """Three pools, every 2 s, one pool's clock 60 s ahead (and a fourth 60 s behind): every slot
        once, none early by the store's clock, and the last slot fired never ahead of that clock."""
        _needs_periodic(store)
        has_clock = type(store).now is not Persistence.now
        checks_clocks = type(store).clock_offsets is not Persistence.clock_offsets
        if not (has_clock or checks_clocks):
            pytest.skip(f"the {store.name} backend has no clock of its own and compares no clocks: its "
                        "pools share one host's clock (as SQLite's do), so no pool's clock can be off")
        ticks = tmp_path / "ticks"
        env = {TICKS_ENV: str(ticks)}
        imports = [KIT_JOBS, TWO_SECONDS]
        for _ in range(2):
            start_pool(["r"], imports=imports, env=env)
        off = [PoolProcess(skewed(backend, skew, tmp_path / f"skew{skew:+.0f}"), queue_name, ["r"],
                           imports=imports, env=env, log_path=tmp_path / f"pool{skew:+.0f}.log")
               for skew in (SKEW, -SKEW)]
        try:
            for pool in off:
                if has_clock:
                    pool.wait_ready()
                else:  # hosts' clocks time the leases: the pool must refuse to start, saying why
                    assert pool.wait(30) != 0, pool.log()
                    assert "clock" in pool.log() and "NTP" in pool.log(), pool.log()
            begun = time.time()
            last_fired: list[tuple[float, float]] = []
            name = "skunkqueue.testing.periodic_two_seconds:every_two_seconds"
            while time.time() < begun + 24:
                last = periodic.last_slot(store, name)
                if last is not None:
                    last_fired.append((last, store.now()))
                time.sleep(0.2)
            ended = time.time()
            time.sleep(3)
            if has_clock:  # the skewed pools ran throughout, on their own clocks
                for pool, skew in zip(off, (SKEW, -SKEW)):
                    assert pool.process.poll() is None, pool.log()
                    assert abs(_first_log_time(pool.log_head()) - begun - skew) < 15, pool.log_head()[:500]
        finally:
            for pool in off:
                pool.stop()
        runs = read_runs(ticks)
        _check_each_slot_once(runs, _slots(2_000_000, begun, ended))
        # (within the tolerance of clocks that stores allow producers: estimates of the store's clock differ)
        ahead = [(round(last, 3), round(now, 3)) for last, now in last_fired if last > now + CLOCK_TOLERANCE]
        assert last_fired and not ahead, f"a last slot fired ahead of the store's clock (last, now): {ahead}"
        # Each slot's job is due at its slot by the store's clock, whichever pool fired it.
        for run in runs:
            record = store.get(run.id)
            assert record is not None
            assert abs(record.due - run.slot) < 1.0, (run.slot, record.due)

    def test_a_schedules_records_keep_the_declaring_queues_options(
            self, store: Persistence, start_pool: Any, tmp_path: Path) -> None:
        """``kit_queue(..., result_ttl=3)``: the pool fires through its own connection, and the
        records still expire 3 s after they finish (not the default 7 days)."""
        _needs_periodic(store)
        # Here, as the pool imports it: importing the module declares its periodic job.
        from skunkqueue.testing.periodic_retention import RESULT_TTL

        ticks = tmp_path / "ticks"
        pool = start_pool(["r"], imports=[KIT_JOBS, RETENTION], env={TICKS_ENV: str(ticks)})
        _wait_for(lambda: len(read_runs(ticks)) >= 2, 15, pool)
        first = read_runs(ticks)[0]
        record = _wait_for(lambda: _finished(store, first.id), 10, pool)
        assert record.result_ttl == RESULT_TTL, f"the record keeps results {record.result_ttl} s, not {RESULT_TTL}"
        assert record.finished is not None
        # Gone within its time to live and a few housekeeping rounds, while the schedule runs on.
        _wait_for(lambda: store.get(first.id) is None, record.finished + RESULT_TTL + 6 - store.now(),
                  pool, f"record {first.id} outlived its result_ttl of {RESULT_TTL} s")
        # The 4th tick is due 3 s after the first, the record may go 3 s after it finished: a race
        # of milliseconds on a loaded machine (CI saw 3), so the schedule gets a moment to go on.
        _wait_for(lambda: len(read_runs(ticks)) >= 4, 10, pool, "the schedule stopped ticking")


def _finished(store: Persistence, job_id: str) -> Any:
    record = store.get(job_id)
    return record if record is not None and record.state in FINISHED_STATES else None


def _wait_for(probe: Callable[[], Any], timeout: float, pool: PoolProcess, what: str = "") -> Any:
    deadline = time.monotonic() + max(timeout, 0.5)
    while True:
        got = probe()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what or 'timed out'}: {pool.log()[-2000:]}"
        time.sleep(0.1)


def _first_log_time(log: str) -> float:
    """The time of a pool's first log line ("2026-11-28 08:53:40,223 INFO ..."), on its own clock."""
    stamp = " ".join(log.split()[:2]).replace(",", ".")
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()
