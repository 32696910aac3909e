"""``skunq work``'s default ``--prefetch auto``, with real pools on SQLite and Redis.

Runs are stamped in a file outside the queue (``start|end token pid time``). What must hold whatever
the adaptive claim size does: a short job held behind a long one starts within the hand-back bound
(on another worker), a pool SIGKILLed with held jobs loses none and runs none twice at once, a job
fired with a higher priority overtakes at most the jobs already claimed, and jobs that are not short
are claimed one at a time.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import redis_servers
from click.testing import CliRunner

from skunkqueue import SkunkQueue, prefetch
from skunkqueue.cli import main
from skunkqueue.pool import HAND_BACK_AFTER
from skunkqueue.record import COMPLETE
from skunkqueue.testing.kit import BackendUnderTest
from skunkqueue.testing.workers import PoolProcess

JOB_MODULE = '''
import os
import time
from skunkqueue.testing.kit import append_line, kit_queue, kit_routes

_queue = kit_queue("prefetching")


@_queue.event(routes=kit_routes(["r"]))
def stamp(path, token, seconds):
    append_line(path, f"start {token} {os.getpid()} {time.time():.6f}")
    if seconds:
        time.sleep(seconds)
    append_line(path, f"end {token} {os.getpid()} {time.time():.6f}")
'''


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis_servers.RedisServer]:
    server = redis_servers.RedisServer(tmp_path_factory.mktemp("redis-prefetch")).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> BackendUnderTest:
    if request.param == "sqlite":
        return BackendUnderTest(name="sqlite", url=str(tmp_path / "q.db"))
    return BackendUnderTest(name="redis", url=request.getfixturevalue("redis_server").url, db="5")


@pytest.fixture
def where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The job module, written where the pools (and this process) import it from."""
    (tmp_path / "prefetchjobs.py").write_text(JOB_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("prefetchjobs", None)
    return tmp_path


def _pool(backend: BackendUnderTest, name: str, where: Path, concurrency: int, lease: float = 30.0,
          new_session: bool = False, log: str = "pool.log") -> PoolProcess:
    # No --prefetch: the default is what these tests are about.
    return PoolProcess(backend, name, ["r"], concurrency=concurrency, log_path=where / log, lease=lease,
                       new_session=new_session, imports=["prefetchjobs"], cwd=where,
                       extra=["--log-level", "WARNING"],
                       env={"PYTHONPATH": os.pathsep.join(filter(None, [str(where), os.environ.get("PYTHONPATH")]))})


class Stamps:
    def __init__(self, backend: BackendUnderTest, name: str, where: Path) -> None:
        import prefetchjobs

        self.queue = SkunkQueue(name, backend=backend.name, conn_url=backend.url, dbname=backend.db)
        self.job = self.queue.event(routes=["r"])(prefetchjobs.stamp.func)
        self.path = where / "runs"

    def fire(self, prefix: str, n: int, seconds: float = 0.0, priority: int | None = None) -> list[str]:
        if priority is not None:
            return [self.job.fire(str(self.path), f"{prefix}{i:03}", seconds, priority=priority).id
                    for i in range(n)]
        return [h.id for h in self.job.fire_many([(str(self.path), f"{prefix}{i:03}", seconds) for i in range(n)])]

    def settle(self, ids: list[str], timeout: float = 90) -> None:
        for job_id in ids:
            self.queue.handle(job_id).wait(timeout=timeout)

    def rows(self) -> list[tuple[str, str, int, float]]:
        text = self.path.read_text() if self.path.exists() else ""
        return [(kind, token, int(pid), float(moment))
                for kind, token, pid, moment in (line.split() for line in text.splitlines())]

    def starts(self) -> dict[str, list[tuple[float, int]]]:
        out: dict[str, list[tuple[float, int]]] = {}
        for kind, token, pid, moment in self.rows():
            if kind == "start":
                out.setdefault(token, []).append((moment, pid))
        return out


def test_the_flag_takes_auto_or_a_number_and_refuses_the_rest_in_one_line() -> None:
    assert prefetch.parse("auto") == prefetch.AUTO and prefetch.parse(" AUTO ") == prefetch.AUTO
    assert prefetch.parse("1") == 1 and prefetch.parse("1000") == 1000
    for bad in ("0", "1001", "-3", "many", "", "2.5"):
        result = CliRunner().invoke(main, ["work", "-q", "q", "-r", "r", "--prefetch", bad,
                                           "--backend", "sqlite", "--url", "/nonexistent/dir/q.db"])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output
        assert "--prefetch" in result.output and "auto or a number of jobs from 1 to 1000" in result.output


def test_auto_claims_more_only_while_jobs_are_short() -> None:
    gauge = prefetch.Prefetch(prefetch.AUTO)
    assert gauge.size() == 1  # nothing known yet: one at a time
    sizes = []
    for _ in range(8):
        gauge.ran(0.0002)
        sizes.append(gauge.size())
    assert sizes[:4] == [2, 4, 8, 16] and gauge.size() == prefetch.AUTO_MAX
    # What is held behind the running job is bounded by the recent pace: the last of n jobs claimed
    # together waits for the n - 1 before it.
    assert (gauge.size() - 1) * 0.0002 <= prefetch.HELD_WAIT
    gauge.ran(2.0)  # one long job: back to one at once
    assert gauge.size() == 1
    gauge.ran(0.0002)
    assert gauge.size() == 1  # the long one still weighs on the pace
    for _ in range(40):
        gauge.ran(0.0002)
    assert gauge.size() == prefetch.AUTO_MAX
    for seconds in (0.02, 0.0002) * 20:  # a mix of long and short jobs: one at a time
        gauge.ran(seconds)
        assert gauge.size() == 1 or seconds < prefetch.HELD_WAIT and gauge.size() <= 2
    for _ in range(40):
        gauge.ran(0.002)  # 2 ms jobs: as many as fit in HELD_WAIT
    assert gauge.size() == 1 + int(prefetch.HELD_WAIT / 0.002)
    assert gauge.size(limit=1) == 1 and gauge.size(limit=0) == 1
    fixed = prefetch.Prefetch(7)
    fixed.ran(5.0)
    assert fixed.size() == 7 and fixed.size(limit=3) == 3


@pytest.mark.serial
def test_a_long_job_holds_no_short_job_past_the_hand_back(backend: BackendUnderTest, where: Path) -> None:
    """Two workers busy with no-op jobs (so claiming several at once), then a long job and short ones
    behind it: the shorts claimed with the long one go back to the queue and run on the other worker.
    A round in which the long job's worker happened to claim it alone (its last jobs were slow on a
    loaded machine) proves nothing, so the test repeats it, up to 4 rounds."""
    name = backend.new_queue_name()
    stamps = Stamps(backend, name, where)
    pool = _pool(backend, name, where, concurrency=2)
    store = backend.open(name)
    held_behind = 0
    try:
        pool.wait_ready(60)
        for round_ in range(4):
            warm = stamps.fire(f"w{round_}", 300)
            fired = time.time()
            ids = stamps.fire(f"L{round_}", 1, seconds=6.0) + stamps.fire(f"s{round_}", 30)
            stamps.settle(warm + ids)
            starts = stamps.starts()
            (long_start, long_pid), = starts[f"L{round_}000"]
            shorts = {token: runs for token, runs in starts.items() if token.startswith(f"s{round_}")}
            assert len(shorts) == 30 and all(len(runs) == 1 for runs in shorts.values()), "a short job ran twice"
            latest = max(moment for (moment, _), in shorts.values())
            # Without the hand-back, those held by the long job's worker would start after its 6 s.
            assert latest - fired < HAND_BACK_AFTER + 2.5, (latest - fired, long_start - fired)
            records = [store.get(job_id) for job_id in ids]
            assert all(r is not None and r.state == COMPLETE and r.attempts == 1 for r in records), \
                "a hand-back charged an attempt"
            # Claimed twice: held by the long job's worker, handed back, claimed by the other.
            held_behind = sum(1 for r in records[1:] if r is not None and r.token >= 2)
            if held_behind:
                break
    finally:
        store.close()
        pool.stop()
    assert held_behind, "no short job was ever held behind the long one: the test proved nothing"


@pytest.mark.serial
def test_a_pool_killed_with_held_jobs_loses_none_and_runs_none_twice_at_once(
        backend: BackendUnderTest, where: Path) -> None:
    """SIGKILL a pool and its workers mid-stream; a second pool finishes. A round in which no
    claimed job was waiting unstarted at the kill proves nothing: up to 3 rounds."""
    name, lease, n = backend.new_queue_name(), 2.0, 600
    stamps = Stamps(backend, name, where)
    stranded = 0
    for round_ in range(3):
        first = _pool(backend, name, where, concurrency=2, lease=lease, new_session=True, log=f"first{round_}.log")
        try:
            first.wait_ready(60)
            ids = stamps.fire(f"k{round_}", n)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and \
                    len([r for r in stamps.rows() if r[1].startswith(f"k{round_}")]) < 300:
                time.sleep(0.002)
            first.signal_group(signal.SIGKILL)  # the pool and its workers: nobody left to hand anything back
            killed_at = time.time()
            first.wait(10)
        finally:
            first.stop()
        killed = {pid for _, token, pid, _ in stamps.rows() if token.startswith(f"k{round_}")}
        second = _pool(backend, name, where, concurrency=2, lease=lease, log=f"second{round_}.log")
        try:
            stamps.settle(ids, timeout=120)
        finally:
            second.stop()
        ends: dict[str, list[tuple[float, int]]] = {}
        for kind, token, pid, moment in stamps.rows():
            if kind == "end":
                ends.setdefault(token, []).append((moment, pid))
        starts = stamps.starts()
        tokens = [f"k{round_}{i:03}" for i in range(n)]
        assert all(token in ends for token in tokens), "a job was lost"
        store = backend.open(name)
        records = [store.get(job_id) for job_id in ids]
        store.close()
        assert all(r is not None and r.state == COMPLETE for r in records)
        for record, token in zip(records, tokens):
            assert record is not None
            runs = sorted(starts[token])
            stranded += record.attempts - len(runs)
            # Never twice at once: a later run starts after the earlier one ended, or after the
            # earlier one's worker was killed and the lease it held ran out.
            for (earlier, pid), (later, _) in zip(runs, runs[1:]):
                finished = [m for m, p in ends.get(token, []) if p == pid and m >= earlier]
                if finished:
                    assert later >= min(finished), (record.id, runs)
                else:
                    assert pid in killed and later >= killed_at + lease * 0.5, (record.id, runs, killed_at)
        if stranded:
            break
    # The killed workers held claimed jobs they never started; those came back at lease expiry,
    # charged an attempt (nobody was left to hand them back), and ran.
    assert stranded >= 1, "no held job was stranded by the kills: the test proved nothing"


@pytest.mark.serial
def test_a_higher_priority_overtakes_all_but_the_jobs_already_claimed(
        backend: BackendUnderTest, where: Path) -> None:
    name = backend.new_queue_name()
    stamps = Stamps(backend, name, where)
    pool = _pool(backend, name, where, concurrency=1)
    try:
        pool.wait_ready(60)
        stamps.settle(stamps.fire("w", 200))
        low = stamps.fire("l", 800)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(stamps.rows()) < 2 * 200 + 2 * 100:
            time.sleep(0.002)
        high = stamps.fire("h", 1, priority=10)
        before = len([r for r in stamps.rows() if r[0] == "start" and r[1].startswith("l")])
        stamps.settle(high + low)
    finally:
        pool.stop()
    order = [token for kind, token, _, _ in stamps.rows() if kind == "start" and token[0] in "lh"]
    overtaken_by = order.index("h000") - before  # low jobs started after the firing, before it
    assert before < 800 and order.index("h000") < 799, "the low jobs ran out first: the test proved nothing"
    # At most the running job, and what was claimed with it: never more than auto's largest claim.
    assert overtaken_by <= prefetch.AUTO_MAX + 1, overtaken_by


@pytest.mark.serial
def test_jobs_that_are_not_short_are_claimed_one_at_a_time(backend: BackendUnderTest, where: Path) -> None:
    name = backend.new_queue_name()
    stamps = Stamps(backend, name, where)
    pool = _pool(backend, name, where, concurrency=1)
    try:
        pool.wait_ready(60)
        low = stamps.fire("l", 40, seconds=0.02)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(stamps.rows()) < 2 * 10:
            time.sleep(0.002)
        high = stamps.fire("h", 1, priority=10)
        before = len([r for r in stamps.rows() if r[0] == "start" and r[1].startswith("l")])
        stamps.settle(high + low)
    finally:
        pool.stop()
    order = [token for kind, token, _, _ in stamps.rows() if kind == "start"]
    # 20 ms jobs: one claimed at a time, so only the running one (and one claim in flight) come first.
    assert order.index("h000") - before <= 1, (order.index("h000"), before)
