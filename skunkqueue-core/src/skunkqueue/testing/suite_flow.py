"""Flow control: priorities, per-key and route limits, paused routes (see ``skunkqueue.flow``).

The protocol half drives the store's claim directly. The lifecycle half runs
real pools and counts what ran from ``start``/``end`` stamps that the jobs
append to a file outside the queue, never through it.

Scale (the issue's figures, scaled so that each test stays well under 30 s on
a loaded machine; the meaning holds): the chaos test runs 60 jobs on 5 keys
(``concurrency=2``) with 3 pools of 3 workers, one pool SIGSTOPped past its
lease and one SIGKILLed; the rate test starts :data:`RATE_JOBS` (100, not 300)
jobs at ``"20/s"`` across 3 pools.

A backend that does not declare ``supports_priorities``, ``supports_limits``
or ``supports_pause`` has those tests skipped, each saying why, and instead
checks that ``fire``, ``queue.limit`` and ``queue.pause`` refuse them in one line.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest

from skunkqueue import flow, policy
from skunkqueue.errors import ConfigurationError
from skunkqueue.flow import Limit
from skunkqueue.persistence import LEASE_OK, Persistence
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import COMPLETE, PENDING, RUNNING
from skunkqueue.testing import jobs
from skunkqueue.testing.clocks import skewed
from skunkqueue.testing.kit import BackendUnderTest
from skunkqueue.testing.suite_support import declare, make_record, wait_until
from skunkqueue.testing.workers import PoolProcess, pid_alive
from skunkqueue.workflow import chain, group

# Keys full of what breaks naive key building: braces (Redis hash tags), colons, $ and dots (Mongo).
NASTY_KEYS = ["t{0}", "t:1:", "$t.2", "t.{3}$", "t 4 :{}"]
CHAOS_JOBS = 60
CHAOS_LEASE = 2.0
RATE_JOBS = 100
RATE = 20  # per second
CLOCK_SKEW = 60.0  # seconds a pool's clock is ahead in the skewed-clock test
SKEWED_JOBS = 30
SKEWED_RATE = 10  # per second
SKEWED_WAVES = 3  # waves of SKEWED_JOBS, until both pools have shown what they do


def _needs(store: Persistence, capability: str) -> None:
    if not getattr(store, capability, False):
        pytest.skip(f"the {store.name} backend does not declare {capability}: flow control of that kind is "
                    "refused there (test_unsupported_flow_control_is_refused checks it)")


def _limited(queue: str, key: str, *, concurrency: int | None = None, interval: float | None = None,
             burst: int | None = None, route: str = "r", **fields: Any) -> Any:
    return make_record(queue, route, limit_key=key, limit_concurrency=concurrency, limit_interval=interval,
                       limit_burst=burst if interval else None, **fields)


def _ids(records: list[Any]) -> list[str]:
    return [r.id for r in records]


def read_stamps(path: Path) -> list[tuple[str, str, float, int]]:
    """(``start``/``end``, name, time, pid) per line of ``jobs.stamp``'s file."""
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        what, name, at, pid = line.split()
        found.append((what, name, float(at), int(pid)))
    return found


def intervals(stamps: list[tuple[str, str, float, int]],
              died: dict[int, float] | None = None) -> list[tuple[str, float, float, int]]:
    """(name, start, end, pid) of every run; a run without an end on a process that died ends when it died."""
    open_runs: dict[tuple[str, int], float] = {}
    runs = []
    for what, name, at, pid in sorted(stamps, key=lambda s: s[2]):
        if what == "start":
            open_runs[(name, pid)] = at
        elif (name, pid) in open_runs:
            runs.append((name, open_runs.pop((name, pid)), at, pid))
    for (name, pid), at in open_runs.items():
        assert died is not None and pid in died, f"run {name} on {pid} never ended and its process did not die"
        runs.append((name, at, died[pid], pid))
    return runs


def most_at_once(runs: list[tuple[float, float]]) -> int:
    """The largest number of runs going on at one instant (an end and a start at the same time do not overlap)."""
    events = sorted([(start, 1) for start, _ in runs] + [(end, -1) for _, end in runs])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def most_in_window(times: list[float], window: float) -> int:
    """The most of ``times`` in any half-open window [t, t + window)."""
    times = sorted(times)
    most, first = 0, 0
    for last, at in enumerate(times):
        while times[first] <= at - window:
            first += 1
        most = max(most, last - first + 1)
    return most


class FlowControlSuite:
    """Mixed into :class:`~skunkqueue.testing.ConformanceSuite`."""

    # == the claim, driven directly ================================================

    def test_claim_order_is_priority_then_fifo(self, store: Persistence, queue_name: str) -> None:
        _needs(store, "supports_priorities")
        low = [make_record(queue_name, priority=-5) for _ in range(2)]
        plain = [make_record(queue_name) for _ in range(3)]
        high = [make_record(queue_name, priority=7) for _ in range(3)]
        later = make_record(queue_name, priority=flow.MAX_PRIORITY, due=time.time() + 60)
        store.enqueue([low[0], plain[0], high[0], plain[1], low[1], high[1], later, plain[2], high[2]])
        assert _ids(store.claim("r", "w", 30, limit=4)) == _ids(high) + [plain[0].id]
        assert _ids(store.claim("r", "w", 30, limit=10)) == _ids(plain[1:]) + _ids(low)
        record = store.get(later.id)
        assert record is not None and record.state == PENDING, "a job due later ran early for its priority"

    def test_a_broadcast_is_claimed_by_priority_like_a_shared_record(self, store: Persistence,
                                                                     queue_name: str) -> None:
        """A broadcast queue's records (each for one worker: ``target``) go by priority too, merged
        with the route's shared records: priority descending, then due, then id."""
        _needs(store, "supports_priorities")
        base = time.time() - 10
        kinds = [("w", -3), (None, -3), (None, 0), ("w", 0), ("other", 9), ("w", 5), (None, 5), ("w", 5),
                 ("w", -1)]
        records = [make_record(queue_name, target=target, priority=priority, due=base + n * 0.01)
                   for n, (target, priority) in enumerate(kinds)]
        store.enqueue(records)
        expected = [records[n] for n in (5, 6, 7, 2, 3, 8, 0, 1)]
        assert _ids(store.claim("r", "w", 30, limit=3)) == _ids(expected[:3])
        assert _ids(store.claim("r", "w", 30, limit=10)) == _ids(expected[3:])
        assert _ids(store.claim("r", "other", 30, limit=10)) == [records[4].id], "another worker's broadcast"
        # Housekeeping purges a dead worker's broadcasts by target: those of a priority too.
        store.enqueue([make_record(queue_name, target="gone", priority=3), make_record(queue_name, target="gone")])
        assert store.purge("r", target="gone") == 2
        assert store.claim("r", "gone", 30, limit=10) == []

    def test_a_full_key_is_skipped_not_charged_and_keeps_its_place(self, store: Persistence,
                                                                   queue_name: str) -> None:
        _needs(store, "supports_limits")
        key_a, key_b = '["f", "a{}:$."]', '["f", "b"]'
        first = [_limited(queue_name, key_a, concurrency=1) for _ in range(3)]
        others = [_limited(queue_name, key_b, concurrency=2) for _ in range(3)]
        plain = make_record(queue_name)
        store.enqueue([*first, *others, plain])
        taken = store.claim("r", "w", 30, limit=10)
        # No head-of-line blocking: a's second and third are skipped, b and the plain job behind them are not.
        assert _ids(taken) == [first[0].id, others[0].id, others[1].id, plain.id]
        for record in (store.get(first[1].id), store.get(first[2].id), store.get(others[2].id)):
            assert record is not None and (record.state, record.attempts, record.token) == (PENDING, 0, 0)
        assert store.claim("r", "w", 30, limit=10) == []
        assert store.flow_waiting("r") == 3
        # The finish frees the slot, and the next of a's jobs (not the third) takes it.
        assert store.finish(first[0].id, taken[0].token, policy.completed(b"1"))
        assert _ids(store.claim("r", "w", 30, limit=10)) == [first[1].id]

    def test_a_slot_is_a_lease_renewed_kept_and_lost_with_it(self, store: Persistence, queue_name: str) -> None:
        _needs(store, "supports_limits")
        key = '["f", "lease"]'
        runs = [_limited(queue_name, key, concurrency=1) for _ in range(2)]
        store.enqueue(runs)
        [held] = store.claim("r", "w1", 1.0, limit=5)
        for _ in range(3):  # renewed past its first lease: the slot stays taken
            time.sleep(0.4)
            assert store.renew("w1", [(held.id, held.token)], 1.0) == {held.id: LEASE_OK}
            assert store.claim("r", "w2", 30, limit=5) == []
        # Not renewed: the slot comes back when the lease runs out, not before.
        time.sleep(0.5)
        assert store.claim("r", "w2", 30, limit=5) == []
        [taker] = wait_until(lambda: store.claim("r", "w2", 30, limit=5), timeout=5,
                             what="the slot of the lost lease")
        assert taker.id == runs[1].id and taker.attempts == 1
        # The lapsed record is still running until housekeeping hands it back, but holds no slot.
        assert held.id in _ids(store.expired_leases(time.time(), limit=100))
        assert store.claim("r", "w3", 30, limit=5) == []

    def test_racing_claims_never_take_more_slots_than_the_limit(self, backend: BackendUnderTest, store: Persistence,
                                                                queue_name: str) -> None:
        _needs(store, "supports_limits")
        key, rounds = '["f", "race"]', 3
        for _ in range(rounds):
            store.enqueue([_limited(queue_name, key, concurrency=2) for _ in range(40)])
            stores = [backend.open(queue_name) for _ in range(6)]
            taken: list[list[Any]] = [[] for _ in stores]
            gate = threading.Barrier(len(stores))

            def claim(mine: Persistence, won: list[Any], worker: str, gate: threading.Barrier) -> None:
                gate.wait()
                for _ in range(5):
                    won += mine.claim("r", worker, 30, limit=3)

            threads = [threading.Thread(target=claim, args=(stores[n], taken[n], f"w{n}", gate))
                       for n in range(len(stores))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            for other in stores:
                other.close()
            won = [record for mine in taken for record in mine]
            assert len(won) == 2, f"{len(won)} claims won a key limited to 2 slots"
            for record in won:  # done: the next round races for two fresh slots
                assert store.finish(record.id, record.token, policy.completed(b"1"))
            store.purge("r")

    def test_an_idle_worker_waits_on_blocked_jobs_instead_of_spinning(self, backend: BackendUnderTest,
                                                                        store: Persistence, queue_name: str) -> None:
        _needs(store, "supports_limits")
        key = '["f", "spin"]'
        first, second = _limited(queue_name, key, concurrency=1), _limited(queue_name, key, concurrency=1)
        store.enqueue([first, second])
        [held] = store.claim("r", "holder", 30)
        waiter = backend.open(queue_name)
        try:
            claims, started = 0, time.monotonic()
            while time.monotonic() - started < 1.5:
                assert waiter.claim("r", "waiter", 30) == []
                claims += 1
                waiter.wait_for_work("r", "waiter", 1.0, time.monotonic() - started)
            # A spinning worker makes thousands of claims in 1.5 s; one that waits, a few dozen at most.
            assert claims <= 40, f"{claims} claims in 1.5 s on a blocked key"
            assert store.finish(held.id, held.token, policy.completed(b"1"))
            freed = time.monotonic()
            taken: list[Any] = []
            while not taken and time.monotonic() - freed < 5:
                waiter.wait_for_work("r", "waiter", 1.0, time.monotonic() - started)
                taken = waiter.claim("r", "waiter", 30)
            assert _ids(taken) == [second.id], "the freed slot was not taken"
        finally:
            waiter.close()

    def test_rate_is_gcra_on_the_stores_clock(self, store: Persistence, queue_name: str) -> None:
        _needs(store, "supports_limits")
        key, interval, burst = '["f", "rate"]', 0.1, 3
        store.enqueue([_limited(queue_name, key, interval=interval, burst=burst) for _ in range(12)])
        taken: list[float] = []
        deadline = time.monotonic() + 20
        while len(taken) < 12 and time.monotonic() < deadline:
            taken += [r.started or 0.0 for r in store.claim("r", "w", 30, limit=12)]
            time.sleep(0.01)
        assert len(taken) == 12
        assert sorted(taken)[burst - 1] - min(taken) < interval, "the burst did not start at once"
        # GCRA: at most burst + W / interval starts in any window of W seconds.
        for window in (0.25, 0.5, 1.0):
            assert most_in_window(taken, window) <= burst + window / interval + 1e-6
        assert max(taken) - min(taken) >= (12 - burst) * interval * 0.95

    def test_route_limit_and_pause_are_settings_every_claim_obeys(self, queue: SkunkQueue,
                                                                   store: Persistence, queue_name: str) -> None:
        _needs(store, "supports_limits")
        _needs(store, "supports_pause")
        route = "api{x}:$.y"
        store.enqueue([make_record(queue_name, route) for _ in range(6)])
        queue.limit(route, concurrency=2)
        time.sleep(flow.SETTINGS_TTL)
        first = store.claim(route, "w", 30, limit=10)
        assert len(first) == 2
        assert store.claim(route, "w", 30, limit=10) == []
        queue.pause(route)
        assert queue.limits([route])[route].paused
        assert store.finish(first[0].id, first[0].token, policy.completed(b"1"))
        time.sleep(flow.SETTINGS_TTL)
        assert store.claim(route, "w", 30, limit=10) == [], "a paused route handed out a job"
        shown = queue.limits([route])[route]
        assert (shown.paused, shown.limit and shown.limit.concurrency, shown.waiting) == (True, 2, 4)
        queue.resume(route)
        queue.limit(route)  # no limit any more
        time.sleep(flow.SETTINGS_TTL)
        assert len(store.claim(route, "w", 30, limit=10)) == 4
        assert flow.route_flow(store, route) == (False, None)

    def test_bad_flow_arguments_get_one_line(self, queue: SkunkQueue, store: Persistence) -> None:
        for bad in ("100", "0/s", "5/fortnight", "x/m", 5):
            with pytest.raises(ConfigurationError) as info:
                Limit(rate=bad)  # type: ignore[arg-type]
            assert "\n" not in str(info.value)
        for kwargs in ({}, {"concurrency": 0}, {"concurrency": True}, {"burst": 2, "concurrency": 1},
                       {"key": "tenant", "concurrency": 1}):
            with pytest.raises(ConfigurationError):
                Limit(**kwargs)
        for priority in (flow.MAX_PRIORITY + 1, 1.5, "high", True):
            with pytest.raises(ConfigurationError):
                queue.event(routes=["r"], priority=priority)(jobs.add.func)  # type: ignore[arg-type]
        if not store.supports_limits:
            return  # fire refuses the limit itself first (test_unsupported_flow_control_is_refused)
        limited = declare(queue, jobs.add, limit=Limit(key=lambda first, second: [first], concurrency=1))
        with pytest.raises(ConfigurationError, match="return a str or an int"):
            limited.fire(1, 2)
        broken = declare(queue, jobs.add, limit=Limit(key=lambda only: only, concurrency=1))
        with pytest.raises(ConfigurationError, match="limit key of .* raised TypeError"):
            broken.fire(1, 2)
        with pytest.raises(ConfigurationError):
            queue.limit("r", rate="fast")

    def test_unsupported_flow_control_is_refused(self, queue: SkunkQueue, store: Persistence) -> None:
        add = declare(queue, jobs.add)
        limited = declare(queue, jobs.add, limit=Limit(concurrency=1))
        cases: list[tuple[str, Callable[[], Any]]] = [
            ("supports_priorities", lambda: add.fire(1, 2, priority=5)),
            ("supports_limits", lambda: limited.fire(1, 2)),
            ("supports_limits", lambda: queue.limit("r", concurrency=3)),
            ("supports_pause", lambda: queue.pause("r")),
        ]
        for capability, call in cases:
            if getattr(store, capability):
                call()
                continue
            with pytest.raises(ConfigurationError) as info:
                call()
            assert capability in str(info.value) and "\n" not in str(info.value)
        if store.supports_pause:
            queue.resume("r")

    # == real pools ==================================================================

    def test_per_key_concurrency_holds_while_pools_are_stopped_and_killed(
            self, queue: SkunkQueue, store: Persistence, start_pool: Any, tmp_path: Path) -> None:
        _needs(store, "supports_limits")
        log = tmp_path / "stamps"
        job = declare(queue, jobs.stamp, limit=Limit(key=lambda path, tenant, name, seconds: tenant, concurrency=2))
        pools = [start_pool(["r"], concurrency=3, lease=CHAOS_LEASE, ready=False) for _ in range(3)]
        for pool in pools:  # started side by side: a pool's start-up is seconds on a loaded machine
            pool.wait_ready()
        stopped, killed = pools[0], pools[1]
        stopped_pids, killed_pids = set(stopped.worker_pids()), set(killed.worker_pids())
        # Fired key after key, so that without the limit the nine workers would run one key's jobs
        # nine at a time; the first job of each key is long, so the stop and the kill catch jobs mid-run.
        per_key = CHAOS_JOBS // len(NASTY_KEYS)
        handles = [job.fire(str(log), NASTY_KEYS[n // per_key], f"j{n}", 2.0 if n % per_key == 0 else 0.15)
                   for n in range(CHAOS_JOBS)]

        def running_on(pids: set[int]) -> bool:
            ended = {(name, pid) for what, name, _, pid in read_stamps(log) if what == "end"}
            return any(what == "start" and pid in pids and (name, pid) not in ended
                       for what, name, _, pid in read_stamps(log))

        wait_until(lambda: running_on(stopped_pids), timeout=20, what="a job on the pool to stop")
        os.kill(stopped.pid, signal.SIGSTOP)  # the pool only: nobody renews its workers' leases
        stopped_at = time.monotonic()
        died: dict[int, float] = {}
        try:
            wait_until(lambda: running_on(killed_pids), timeout=20, what="a job on the pool to kill")
            os.kill(killed.pid, signal.SIGKILL)  # its workers die with it (PR_SET_PDEATHSIG)
            wait_until(lambda: not any(pid_alive(p) for p in killed_pids), timeout=10, what="the workers to die")
            died = dict.fromkeys(killed_pids, time.time())  # they died no later than this
            time.sleep(max(0.0, CHAOS_LEASE * 1.75 - (time.monotonic() - stopped_at)))
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
        for handle in handles:
            assert handle.wait(timeout=60)
        runs = intervals(read_stamps(log), died)
        for n, tenant in enumerate(NASTY_KEYS):
            mine = [(start, end) for name, start, end, _ in runs if int(name[1:]) // per_key == n]
            assert most_at_once(mine) <= 2, f"more than 2 runs of key {tenant!r} at once"
        assert {name for name, *_ in runs} == {f"j{n}" for n in range(CHAOS_JOBS)}, "a job never ran"
        # Attempts against starts: a healthy worker starts every job it claims, so an attempt without a
        # start is a claim stranded on a worker of the stopped or killed pool (each holds at most one:
        # prefetch 1), never one charged for waiting on the limit.
        troubled = stopped_pids | killed_pids
        stranded = 0
        for n, handle in enumerate(handles):
            record = store.get(handle.id)
            assert record is not None and record.state == COMPLETE
            starts = [pid for name, _, _, pid in runs if name == f"j{n}"]
            assert record.attempts >= len(starts) >= 1
            stranded += record.attempts - len(starts)
            if not set(starts) & troubled:
                assert record.attempts <= 2, f"{record.id} was charged {record.attempts} attempts waiting on a limit"
        assert stranded <= len(troubled), f"{stranded} attempts without a start: charged for waiting on the limit"

    def test_rate_holds_across_pools(self, queue: SkunkQueue, store: Persistence, start_pool: Any,
                                     tmp_path: Path) -> None:
        _needs(store, "supports_limits")
        log = tmp_path / "stamps"
        job = declare(queue, jobs.stamp, limit=Limit(rate=f"{RATE}/s"))
        handles = job.fire_many([(str(log), "all", f"j{n}") for n in range(RATE_JOBS)])
        for pool in [start_pool(["r"], concurrency=2, ready=False) for _ in range(3)]:
            pool.wait_ready()
        for handle in handles:
            assert handle.wait(timeout=60)
        claimed = [record.started or 0.0 for record in (store.get(h.id) for h in handles) if record is not None]
        starts = {name: at for what, name, at, _ in read_stamps(log) if what == "start"}
        assert len(claimed) == len(starts) == RATE_JOBS
        # The store's claim times: burst 1, so at most RATE in any second (spaced 1/RATE apart).
        assert most_in_window(claimed, 1.0) <= RATE
        # The stamps, outside the queue: each lags its claim by a varying delay; allow that spread.
        lags = [starts[f"j{n}"] - claimed[n] for n in range(RATE_JOBS)]
        spread = max(lags) - min(lags)
        assert most_in_window(list(starts.values()), 1.0) <= int(RATE * (1.0 + spread)) + 1, spread
        assert max(claimed) - min(claimed) >= (RATE_JOBS - 1) / RATE * 0.95, "faster than the rate"

    def test_a_pool_whose_clock_is_a_minute_ahead_starts_no_faster_than_the_rate(
            self, backend: BackendUnderTest, queue: SkunkQueue, store: Persistence, queue_name: str,
            start_pool: Any, tmp_path: Path) -> None:
        """The bucket is kept on the store's clock: a pool whose clock is 60 s ahead takes its share
        of the starts, and with a pool on the right clock starts no faster than the rate. A bucket
        on the claimer's clock would let the pool ahead move it a minute on, locking the other out."""
        _needs(store, "supports_limits")
        has_clock = type(store).now is not Persistence.now
        checks_clocks = type(store).clock_offsets is not Persistence.clock_offsets
        if not (has_clock or checks_clocks):
            pytest.skip(f"the {store.name} backend has no clock of its own and compares no clocks: its "
                        "pools share one host's clock (as SQLite's do), so no pool's clock can be off")
        start_pool(["r"], concurrency=2)
        ahead = PoolProcess(skewed(backend, CLOCK_SKEW, tmp_path / "skew"), queue_name, ["r"], concurrency=2,
                            log_path=tmp_path / "ahead.log")
        log = tmp_path / "stamps"
        handles: list[Any] = []
        mine: list[bool] = []  # in the order of the starts: whether the pool ahead made it
        started: dict[str, tuple[float, int]] = {}  # name: (true time, pid) of each start
        try:
            if not has_clock:  # hosts' clocks time the leases and rates: the pool must refuse to start
                assert ahead.wait(60) != 0, ahead.log()
                assert "clock" in ahead.log() and "NTP" in ahead.log(), ahead.log()
                return
            ahead.wait_ready()
            ahead_pids = set(ahead.worker_pids())
            job = declare(queue, jobs.stamp, limit=Limit(rate=f"{SKEWED_RATE}/s"))
            # Each pool's two workers race the other's for every start: about half each (6 to 23
            # of 30 in 16 runs on Redis, MongoDB and PostgreSQL under load). But a pool a loaded
            # machine leaves without CPU for the wave's 3 s may get 1 (so CI once), which shows
            # nothing; another wave then gives it its chance. With the bucket on the claimer's
            # clock the pool ahead takes every start after its first, however many waves (tried on
            # MongoDB with the grant's $$NOW replaced by the claimer's clock: 90 of 90).
            for _ in range(SKEWED_WAVES):
                fired = len(handles)
                handles += job.fire_many([(str(log), "all", f"j{n}") for n in range(fired, fired + SKEWED_JOBS)])
                for handle in handles[fired:]:
                    assert handle.wait(timeout=60)
                started = {name: (at, pid) for what, name, at, pid in read_stamps(log) if what == "start"}
                mine = [pid in ahead_pids for _, pid in sorted(started.values())]
                if mine.count(True) >= 4 and mine[mine.index(True):].count(False) >= 4:
                    break
        finally:
            ahead.stop()
        claimed = [record.started or 0.0 for record in (store.get(h.id) for h in handles) if record is not None]
        assert len(claimed) == len(started) == len(handles)
        # The store's claim times: burst 1, so starts are 1/SKEWED_RATE apart at least.
        assert most_in_window(claimed, 1.0 - 1e-6) <= SKEWED_RATE
        assert max(claimed) - min(claimed) >= (len(handles) - 1) / SKEWED_RATE * 0.95, "faster than the rate"
        # The stamps, on the host's true clock whichever pool wrote them: the rate, allowing for the
        # spread of the lags between a claim and its start.
        lags = [started[f"j{n}"][0] - claimed[n] for n in range(len(handles))]
        spread = max(lags) - min(lags)
        assert most_in_window([at for at, _ in started.values()], 1.0) <= int(SKEWED_RATE * (1.0 + spread)) + 1
        shown = "".join("A" if by_ahead else "r" for by_ahead in mine)  # A: a start of the pool ahead
        assert mine.count(True) >= 4, f"the pool ahead started {mine.count(True)} jobs in {len(handles)}: {shown}"
        assert mine[mine.index(True):].count(False) >= 4, \
            f"the pool on the right clock was locked out once the pool ahead started a job: {shown}"

    def test_higher_priority_runs_first(self, queue: SkunkQueue, store: Persistence, start_pool: Any,
                                        tmp_path: Path) -> None:
        _needs(store, "supports_priorities")
        log = tmp_path / "executions"
        mark = declare(queue, jobs.mark)
        low = mark.fire_many([(str(log), f"low{n}") for n in range(100)])
        high = [mark.fire(str(log), f"high{n}", priority=10) for n in range(10)]
        start_pool(["r"])
        for handle in low + high:
            assert handle.wait(timeout=60)
        order = log.read_text().split()
        assert order[:10] == [f"high{n}" for n in range(10)], order[:12]
        assert order[10:] == [f"low{n}" for n in range(100)]

    def test_pause_and_resume(self, queue: SkunkQueue, store: Persistence, start_pool: Any, tmp_path: Path) -> None:
        _needs(store, "supports_pause")
        log = tmp_path / "executions"
        mark = declare(queue, jobs.mark)
        start_pool(["r"], concurrency=2)
        assert mark.fire(str(log), "before").wait(timeout=30)
        queue.pause("r")
        time.sleep(flow.SETTINGS_TTL)  # a claim may use what it read a second ago
        handles = [mark.fire(str(log), f"paused{n}") for n in range(5)]
        time.sleep(2.0)
        assert log.read_text().split() == ["before"], "a paused route ran a job"
        for handle in handles:
            record = store.get(handle.id)
            assert record is not None and (record.state, record.attempts) == (PENDING, 0)
        assert queue.limits(["r"])["r"].waiting == 5
        queue.resume("r")
        for handle in handles:
            assert handle.wait(timeout=30)
        assert sorted(log.read_text().split()) == sorted(["before", *(f"paused{n}" for n in range(5))])

    def test_a_blocked_key_does_not_delay_other_keys(self, queue: SkunkQueue, store: Persistence,
                                                     start_pool: Any, tmp_path: Path) -> None:
        _needs(store, "supports_limits")
        log = tmp_path / "stamps"
        job = declare(queue, jobs.stamp, limit=Limit(key=lambda path, tenant, name, seconds: tenant, concurrency=1))
        long = job.fire(str(log), "a", "a-long", 4.0)
        blocked = [job.fire(str(log), "a", f"a{n}", 0.05) for n in range(5)]
        free = [job.fire(str(log), "b{}", f"b{n}", 0.05) for n in range(5)]
        start_pool(["r"], concurrency=2)
        for handle in free:
            assert handle.wait(timeout=30)
        assert long.state == RUNNING, "the other key's jobs waited for the blocked key's long job"
        for handle in [long, *blocked]:
            assert handle.wait(timeout=30)
        runs = {name: (start, end) for name, start, end, _ in intervals(read_stamps(log))}
        assert all(runs[f"b{n}"][1] < runs["a-long"][1] for n in range(5))
        assert all(runs[f"a{n}"][0] >= runs["a-long"][1] for n in range(5)), "key a ran two at once"

    def test_async_jobs_obey_the_limit(self, queue: SkunkQueue, store: Persistence, start_pool: Any,
                                       tmp_path: Path) -> None:
        _needs(store, "supports_limits")
        log = tmp_path / "async"
        anap = declare(queue, jobs.anap, limit=Limit(concurrency=2))
        start_pool(["r"], extra=["--async-concurrency", "6"])
        handles = [anap.fire(0.3, str(log)) for _ in range(8)]
        for handle in handles:
            assert handle.wait(timeout=30)
        lines = [line.split() for line in log.read_text().splitlines()]
        begun = {ident: float(at) for what, ident, at, _ in lines if what == "start"}
        ended = {ident: float(at) for what, ident, at, _ in lines if what == "end"}
        assert len(begun) == len(ended) == 8
        assert most_at_once([(begun[i], ended[i]) for i in begun]) == 2

    @pytest.mark.parametrize("loop", ["sync", "async"])
    def test_burst_waits_for_limited_jobs_but_not_for_paused_or_later_ones(
            self, loop: str, queue: SkunkQueue, store: Persistence, start_pool: Any, tmp_path: Path) -> None:
        """``--burst`` runs until nothing is due or waiting on a limit: jobs a limit holds back will
        become claimable, so the pool waits for them; a paused route's and a later job do not keep it."""
        _needs(store, "supports_limits")
        _needs(store, "supports_pause")
        log, marks = tmp_path / "stamps", tmp_path / "marks"
        keyed = declare(queue, jobs.stamp, limit=Limit(key=lambda path, tenant, name, seconds: tenant,
                                                       concurrency=1))
        rated = declare(queue, jobs.mark, limit=Limit(rate="4/s"))
        held_back = [keyed.fire(str(log), "k{}:$.", f"k{n}", 0.05) for n in range(4)]
        spaced = [rated.fire(str(marks), f"m{n}") for n in range(4)]
        later = declare(queue, jobs.add).fire_at(timedelta(seconds=120), 1, 2)
        queue.pause("p")
        paused = [declare(queue, jobs.mark, route="p").fire(str(marks), f"p{n}") for n in range(2)]
        # The key's one slot is taken by a claim of this test, so the pool finds k1..k3 blocked.
        [held] = store.claim("r", "holder", 60, limit=1)
        assert held.id == held_back[0].id
        extra = ["--burst"] + (["--async-concurrency", "2"] if loop == "async" else [])
        pool = start_pool(["r", "p"], concurrency=2, extra=extra, ready=False)
        wait_until(lambda: pool.process.poll() is not None or (marks.exists() and len(marks.read_text().split()) == 4),
                   timeout=60, what="the rate-limited jobs")
        time.sleep(1.5)  # a pool that gave up on the blocked key has exited by now
        assert pool.process.poll() is None, f"--burst exited with due jobs waiting on a limit: {pool.log()}"
        released = time.time()
        assert store.finish(held.id, held.token, policy.completed(b"3"))
        assert pool.wait(60) == 0, pool.log()
        assert "no due job left" in pool.log()
        for handle in [*held_back[1:], *spaced]:
            record = store.get(handle.id)
            assert record is not None and (record.state, record.attempts) == (COMPLETE, 1), record
        starts = {name: at for what, name, at, _ in read_stamps(log) if what == "start"}
        assert sorted(starts) == ["k1", "k2", "k3"] and min(starts.values()) >= released
        for handle in [later, *paused]:  # not due, or paused: left for another run
            record = store.get(handle.id)
            assert record is not None and (record.state, record.attempts) == (PENDING, 0), record
        assert sorted(marks.read_text().split()) == [f"m{n}" for n in range(4)]
        queue.resume("p")

    def test_a_workflow_step_obeys_its_limit(self, queue: SkunkQueue, store: Persistence, start_pool: Any,
                                             tmp_path: Path) -> None:
        _needs(store, "supports_limits")
        if not store.supports_workflows:
            pytest.skip(f"the {store.name} backend does not run workflows (supports_workflows = False)")

        log = tmp_path / "stamps"
        add = declare(queue, jobs.add)
        step = declare(queue, jobs.stamped_step,
                       limit=Limit(key=lambda path, tenant, name, seconds: tenant, concurrency=1))
        flow_handle = chain(add.s(1, 2), group(*(step.s(str(log), "one{}", f"s{n}", 0.2) for n in range(4)))).fire()
        start_pool(["r"], concurrency=3)
        assert flow_handle.wait(timeout=60) == [f"s{n}" for n in range(4)]
        runs = [(start, end) for _, start, end, _ in intervals(read_stamps(log))]
        assert len(runs) == 4 and most_at_once(runs) == 1
