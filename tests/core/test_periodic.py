"""Slots of periodic jobs against a fixed clock, and schedulers racing on one store."""

from __future__ import annotations

import json
import math
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from skunkqueue import SkunkQueue, periodic
from skunkqueue.errors import ConfigurationError
from skunkqueue.job import Job
from skunkqueue.testing import jobs


def at(text: str) -> int:
    """A moment as epoch microseconds, the unit of slots."""
    return periodic.micros_of(datetime.fromisoformat(text))


def utc(slot: int) -> str:
    return datetime.fromtimestamp(slot / 1e6, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


S = 1_000_000  # one second in microseconds


@pytest.fixture
def queue(tmp_path: Path) -> SkunkQueue:
    return SkunkQueue("periodic-test", conn_url=str(tmp_path / "q.db"))


def schedule(queue: SkunkQueue, **spec: object) -> periodic.Schedule:
    job = queue.periodic(routes=["r"], **spec)(jobs.whoami.func)  # type: ignore[arg-type]
    assert job.schedule is not None
    return job.schedule


def test_every_slots_are_whole_multiples_and_never_early(queue: SkunkQueue) -> None:
    s = schedule(queue, every=timedelta(seconds=30))
    now = at("2026-11-28T10:00:29+00:00")
    assert utc(int(s.next_slot(now / S) * S)) == "2026-11-28 10:00:30"
    assert s.due_slots(now, last=at("2026-11-28T10:00:00+00:00")) == []           # 10:00:30 not yet
    assert s.due_slots(now + S - 1, last=at("2026-11-28T10:00:00+00:00")) == []   # a microsecond before
    assert s.due_slots(now + S, last=at("2026-11-28T10:00:00+00:00")) == [now + S]  # exactly at 10:00:30
    assert s.due_slots(now + S, last=now + S) == []                                 # never twice


def test_after_downtime_only_the_latest_slot_within_the_grace_fires(queue: SkunkQueue) -> None:
    s = schedule(queue, every=10, misfire_grace=15)
    last = at("2026-11-28T10:00:00+00:00")
    assert [utc(x) for x in s.due_slots(at("2026-11-28T10:05:04+00:00"), last)] == ["2026-11-28 10:05:00"]
    assert s.due_slots(at("2026-11-28T10:05:09.5+00:00"), last) != []
    assert s.due_slots(at("2026-11-28T10:05:15+00:00"), last) != []   # exactly the grace old
    assert s.due_slots(at("2026-11-28T10:05:09.999999+00:00"), at("2026-11-28T10:05:00+00:00")) == []
    # The latest slot is older than the grace: nothing fires until the next one.
    tight = schedule(queue, every=60, misfire_grace=5)
    assert tight.due_slots(at("2026-11-28T10:05:06+00:00"), last) == []


def test_catch_up_fires_every_missed_slot(queue: SkunkQueue) -> None:
    s = schedule(queue, every=10, catch_up=True)
    last = at("2026-11-28T10:00:00+00:00")
    due = s.due_slots(at("2026-11-28T10:00:45+00:00"), last)
    assert [utc(x)[-2:] for x in due] == ["10", "20", "30", "40"]


def test_cron_across_daylight_saving_changes_in_berlin(queue: SkunkQueue) -> None:
    daily = schedule(queue, cron="30 2 * * *", tz="Europe/Berlin")
    # 2026-03-29: clocks jump 02:00 -> 03:00, so 02:30 does not exist: it fires at 03:00 CEST.
    spring = daily.slots_after(at("2026-03-28T12:00:00+00:00"))
    assert [utc(next(spring)) for _ in range(2)] == ["2026-03-29 01:00:00", "2026-03-30 00:30:00"]
    # 2026-10-25: 02:30 happens twice (CEST, then CET): it fires once, at the first.
    autumn = daily.slots_after(at("2026-10-24T12:00:00+00:00"))
    assert [utc(next(autumn)) for _ in range(2)] == ["2026-10-25 00:30:00", "2026-10-26 01:30:00"]
    # The latest slot, as a check finds it, agrees: 03:00 CEST on the spring day, the first 02:30 in autumn.
    assert utc(daily.latest_slot(at("2026-03-29T01:00:30+00:00"))) == "2026-03-29 01:00:00"  # type: ignore[arg-type]
    assert utc(daily.latest_slot(at("2026-10-25T01:30:30+00:00"))) == "2026-10-25 00:30:00"  # type: ignore[arg-type]
    # An interval-like cron keeps its real-time rhythm through the repeated hour.
    half_hourly = schedule(queue, cron="*/30 * * * *", tz="Europe/Berlin")
    slots = half_hourly.slots_after(at("2026-10-25T00:10:00+00:00"))
    assert [utc(next(slots))[11:16] for _ in range(4)] == ["00:30", "01:00", "01:30", "02:00"]


def test_bad_schedules_are_refused_with_one_clear_line(queue: SkunkQueue) -> None:
    with pytest.raises(ConfigurationError, match="exactly one of"):
        schedule(queue, every=10, cron="* * * * *")
    with pytest.raises(ConfigurationError, match="exactly one of"):
        schedule(queue)
    with pytest.raises(ConfigurationError, match="cron expression"):
        schedule(queue, cron="61 * * * *")
    with pytest.raises(ConfigurationError, match="Unknown time zone"):
        schedule(queue, cron="0 3 * * *", tz="Mars/Olympus")
    with pytest.raises(ConfigurationError, match="positive"):
        schedule(queue, every=timedelta(0))
    with pytest.raises(ConfigurationError, match="fired with no arguments"):
        queue.periodic(routes=["r"], every=10)(jobs.add.func)


def test_racing_schedulers_fire_each_slot_once_and_pause_holds(queue: SkunkQueue) -> None:
    s = schedule(queue, every=10)
    store = queue.persistence

    def enqueue(sched: periodic.Schedule, due: float, key: str) -> None:
        Job(queue, sched.job.func, sched.job.routes)._fire([((), {})], due, [key])

    one, two = periodic.Scheduler(store, [s], enqueue), periodic.Scheduler(store, [s], enqueue)
    start = at("2026-11-28T10:00:05+00:00") // S   # tick takes the store's clock in seconds
    for step in range(6):                       # 10:00:05 .. 10:00:55, both schedulers each time
        now = start + step * 10
        one.tick(now)
        two.tick(now)
    records = store.list_jobs()
    # 10:00:00 (the latest slot at the first check, within the grace) to 10:00:50, once each.
    assert sorted(r.due for r in records) == [start - 5 + 10 * i for i in range(6)]
    assert periodic.last_slot(store, s.name) == start + 45
    periodic.set_paused(store, s.name, True)
    assert one.tick(start + 70) == 0 and two.tick(start + 70) == 0
    periodic.set_paused(store, s.name, False)
    assert one.tick(start + 70) == 1 and two.tick(start + 70) == 0
    assert len(store.list_jobs()) == 7  # 10:01:10; 10:01:00 was missed while paused


def test_skunq_periodic_lists_pauses_resumes_and_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from skunkqueue.cli import main

    (tmp_path / "sched_app.py").write_text(
        "from skunkqueue import SkunkQueue\n"
        "q = SkunkQueue('cli-periodic')\n"
        "@q.periodic(cron='0 3 * * *', tz='Europe/Berlin', routes=['reports'])\n"
        "def nightly():\n    return 1\n")
    monkeypatch.chdir(tmp_path)
    base = ["periodic", "-q", "cli-periodic", "--import", "sched_app", "--url", str(tmp_path / "q.db")]
    runner = CliRunner()
    listed = runner.invoke(main, base)
    assert listed.exit_code == 0, listed.output
    assert "sched_app:nightly  cron '0 3 * * *' Europe/Berlin  routes=reports  last=-  next=" in listed.output
    assert runner.invoke(main, [*base, "pause", "sched_app:nightly"]).output.strip() == "sched_app:nightly: paused"
    assert runner.invoke(main, base).output.rstrip().endswith("paused")
    assert runner.invoke(main, [*base, "resume", "sched_app:nightly"]).exit_code == 0
    assert "paused" not in runner.invoke(main, base).output
    ran = runner.invoke(main, [*base, "run", "sched_app:nightly"])
    assert ran.exit_code == 0 and "fired as" in ran.output
    assert [r.func for r in SkunkQueue("cli-periodic", conn_url=str(tmp_path / "q.db")).jobs()] == ["sched_app:nightly"]
    missing = runner.invoke(main, [*base, "pause", "nope"])
    assert missing.exit_code == 1 and "No periodic job nope" in missing.output and "Traceback" not in missing.output
    bare = runner.invoke(main, ["periodic", "-q", "cli-periodic", "--url", str(tmp_path / "q.db")])
    assert bare.exit_code == 2 and "--import" in bare.output


def test_a_fractional_interval_fires_each_slot_once_whoever_reckons_it(tmp_path: Path) -> None:
    """every=1.1 s: a slot reached by a chain of float additions (the first check's walk from
    the grace window) and the same slot reached by a multiplication (the next check's) were
    different numbers (…27.299999 and …27.3), so it fired twice, under keys a millisecond apart.
    (On de463b8, 28 of these 40 starting moments fired a slot twice.)"""
    twice: dict[str, list[str]] = {}
    for n in range(40):
        queue = SkunkQueue(f"fraction-{n}", conn_url=str(tmp_path / "q.db"))
        job = queue.periodic(routes=["r"], every=timedelta(seconds=1.1))(jobs.whoami.func)
        assert job.schedule is not None
        scheduler = periodic.Scheduler(queue.persistence, [job.schedule], periodic.enqueue_on(queue))
        start = 1_764_300_000.0 + 13.37 * n
        for step in range(80):  # 20 s of checks every 0.25 s
            scheduler.tick(start + step * 0.25)
        records = queue.persistence.list_jobs(limit=1000)
        by_slot: dict[int, list[str]] = {}
        for record in records:
            by_slot.setdefault(round(record.due * 10), []).append(str(record.key))
            assert record.key is not None
            slot = periodic.slot_of(json.loads(record.key)[1], job.name)
            # Every slot is a whole multiple of 1.1 s since the epoch, and its key names it exactly.
            assert slot is not None and round(slot * 10) % 11 == 0 and slot == record.due
        assert len(by_slot) >= 17
        twice.update({f"{start}/{slot}": keys for slot, keys in by_slot.items() if len(keys) > 1})
        queue.close()
    assert not twice, f"slots fired more than once: {twice}"


def test_one_slot_has_one_key_however_it_is_reached(queue: SkunkQueue) -> None:
    tenth = schedule(queue, every=0.1)
    third = schedule(queue, every=timedelta(microseconds=333_333))
    for s in (tenth, third):
        far = s.slots_after(0)  # 17 billion additions would take too long: start a day back
        day_back = at("2026-11-27T10:00:00+00:00")
        walked = s.slots_after(day_back)
        targets = {next(walked) for _ in range(100_000)}
        for slot in list(targets)[:2000]:
            assert s.due_slots(slot, None) == [slot]
            assert s.key(slot) == s.key(s.slots_after(slot - 1).__next__())
        assert next(far) == s.every_us
    # The text of a slot: milliseconds when exact (as before), microseconds when not.
    assert tenth.key(at("2026-11-28T10:00:00.1+00:00")).endswith("@2026-11-28T10:00:00.100+00:00")
    assert third.key(333_333).endswith("@1970-01-01T00:00:00.333333+00:00")
    assert periodic.slot_of(third.key(333_333), third.name) == 0.333333


def test_cron_slots_have_one_key_whatever_the_starting_point(queue: SkunkQueue) -> None:
    every_minute = schedule(queue, cron="* * * * *", tz="Europe/Berlin")
    base = at("2026-10-25T00:58:00+00:00")  # through the repeated hour
    keys = set()
    for offset in (0, 1, 999_999, 30 * S + 17, 59 * S):
        slot = every_minute.next_slot((base + offset) / S)
        keys.add(every_minute.key(periodic.micros(slot)))
    assert keys == {every_minute.key(base + 60 * S)}


def test_a_job_rebound_to_another_connection_keeps_every_option_of_its_declaration(tmp_path: Path) -> None:
    """What a pool (or ``skunq periodic run``) rebuilds from a declaration carries all of it: the
    queue's result_ttl, serializer and type, and the job's retries, back-off, timeout."""
    url = str(tmp_path / "q.db")
    declaring = SkunkQueue("rebound", conn_url=url, result_ttl=3, serializer="pickle")
    job = declaring.periodic(routes=["r"], every=5, retries=2, retry_backoff=0.5, timeout=9)(jobs.whoami.func)
    plain = SkunkQueue("rebound", conn_url=url)  # as a pool opens it: the connection only
    handle = job.on(plain).fire()
    record = plain.get(handle.id)
    assert record is not None
    assert (record.result_ttl, record.serializer, record.retries, record.retry_backoff, record.timeout) == \
        (3.0, "pickle", 2, 0.5, 9)
    assert job.schedule is not None
    fired = periodic.fire_now(job.schedule, plain)  # skunq periodic run, the monitor's "run now"
    again = plain.get(fired.id)
    assert again is not None and (again.result_ttl, again.serializer) == (3.0, "pickle")
    # A broadcast's deliveries follow the live workers: rebound, the job is still a broadcast.
    shout = SkunkQueue("rebound", conn_url=url, queue_type="broadcast").event(routes=["r"])(jobs.add.func)
    assert shout.on(plain).fire(1, 2).ids == []  # no live worker: no delivery, as on its own queue
    with pytest.raises(ConfigurationError, match="is declared on queue 'rebound', not 'other'"):
        job.on(SkunkQueue("other", conn_url=url))
    with pytest.raises(ConfigurationError, match="Periodic jobs need a direct queue"):
        SkunkQueue("b", conn_url=url, queue_type="broadcast").periodic(routes=["r"], every=5)(jobs.whoami.func)


def test_a_tiny_interval_costs_one_step_per_check(queue: SkunkQueue) -> None:
    """every=1 µs with a 60 s grace: the latest slot is computed, not walked to (60 million steps)."""
    s = schedule(queue, every=timedelta(microseconds=1))
    now = at("2026-11-28T10:00:00.123456+00:00")
    started = time.perf_counter()
    assert s.due_slots(now, None) == [now]
    assert s.due_slots(now, now - 7) == [now]
    assert s.due_slots(now, now) == []
    assert time.perf_counter() - started < 0.1
    assert s.key(now).endswith("@2026-11-28T10:00:00.123456+00:00")


def test_an_infinite_grace_fires_the_latest_slot_however_old_and_nan_is_refused(queue: SkunkQueue) -> None:
    s = schedule(queue, every=60, misfire_grace=math.inf)
    last = at("2020-01-01T00:00:00+00:00")
    now = at("2026-11-28T10:00:30+00:00")
    assert [utc(x) for x in s.due_slots(now, last)] == ["2026-11-28 10:00:00"]
    assert s.due_slots(now, None) == [at("2026-11-28T10:00:00+00:00")]
    hourly = schedule(queue, cron="0 * * * *", misfire_grace=10**12)
    assert [utc(x) for x in hourly.due_slots(now, now - 3600 * S)] == ["2026-11-28 10:00:00"]
    with pytest.raises(ConfigurationError, match="misfire_grace"):
        schedule(queue, every=60, misfire_grace=math.nan)
    # No walk from the past: an infinite grace on a cron schedule fired nothing on de463b8 (OverflowError).
    minutely = schedule(queue, cron="* * * * *", misfire_grace=math.inf)
    assert minutely.due_slots(now, None) == [at("2026-11-28T10:00:00+00:00")]
    assert minutely.due_slots(now, last) == [at("2026-11-28T10:00:00+00:00")]


def test_a_schedule_that_fails_its_check_does_not_stop_the_others(queue: SkunkQueue,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    broken, fine = schedule(queue, every=10), schedule(queue, cron="* * * * *")

    def enqueue(sched: periodic.Schedule, due: float, key: str) -> None:
        if sched is broken:
            raise RuntimeError("a bug in a schedule")
        periodic.enqueue_on(queue)(sched, due, key)

    scheduler = periodic.Scheduler(queue.persistence, [broken, fine], enqueue)
    assert scheduler.tick(at("2026-11-28T10:00:05+00:00") / S) == 1  # the pool's loop goes on
    assert "a bug in a schedule" in caplog.text
