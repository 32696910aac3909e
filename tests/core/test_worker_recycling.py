"""``skunq work --burst``, ``--max-jobs-per-child`` and ``--max-memory-per-child``, with real pools.

Executions are counted in a file outside the queue (``token pid rss``): each job
must run exactly once, none charged an extra attempt, whatever the recycling.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest
import redis_servers

from skunkqueue import SkunkQueue
from skunkqueue.record import COMPLETE, ERROR, PENDING
from skunkqueue.testing import jobs
from skunkqueue.testing.kit import BackendUnderTest
from skunkqueue.testing.workers import PoolProcess

JOB_MODULE = '''
import atexit
import os
import signal
import time
from skunkqueue.testing.kit import append_line, kit_queue, kit_routes
from skunkqueue.worker import resident_mb

_queue = kit_queue("recycling")
_kept = []  # what hoard() holds on to: the worker process keeps growing, as a leaky job would


def _note_interrupt_disposition():
    path = os.environ.get("RECYCLE_DISPOSITION")
    if path:
        append_line(path, f"{os.getpid()} {signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN}")


atexit.register(_note_interrupt_disposition)


@_queue.event(routes=kit_routes(["r"]))
def hoard(mb, path, token):
    _kept.append(b"x" * (mb * 1_000_000))
    append_line(path, f"{token} {os.getpid()} {resident_mb():.1f}")


@_queue.event(routes=kit_routes(["r"]))
def span(path, token, seconds):
    append_line(path, f"start {token} {os.getpid()} {time.time():.6f}")
    time.sleep(seconds)
    append_line(path, f"end {token} {os.getpid()} {time.time():.6f}")
'''


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis_servers.RedisServer]:
    server = redis_servers.RedisServer(tmp_path_factory.mktemp("redis-recycling")).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> BackendUnderTest:
    if request.param == "sqlite":
        return BackendUnderTest(name="sqlite", url=str(tmp_path / "q.db"))
    return BackendUnderTest(name="redis", url=request.getfixturevalue("redis_server").url, db="4")


@pytest.fixture
def hoard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The job module, written where the pools (and this process) import it from."""
    (tmp_path / "recyclejobs.py").write_text(JOB_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("recyclejobs", None)
    return tmp_path


def _queue(backend: BackendUnderTest, name: str) -> SkunkQueue:
    return SkunkQueue(name, backend=backend.name, conn_url=backend.url, dbname=backend.db)


def _runs(path: Path) -> list[tuple[str, int, float]]:
    rows = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
    return [(token, int(pid), float(rss)) for token, pid, rss in rows]


def _pool(backend: BackendUnderTest, name: str, where: Path, extra: list[str],
          concurrency: int = 2, lease: float = 30.0, new_session: bool = False,
          log: str = "pool.log") -> PoolProcess:
    return PoolProcess(backend, name, ["r"], concurrency=concurrency, log_path=where / log, lease=lease,
                       new_session=new_session,
                       imports=["recyclejobs", "skunkqueue.testing.jobs"], extra=extra, cwd=where,
                       env={"PYTHONPATH": os.pathsep.join(filter(None, [str(where), os.environ.get("PYTHONPATH")]))})


def _fire_hoards(backend: BackendUnderTest, name: str, runs: Path, n: int, mb: int) -> list[str]:
    import recyclejobs

    job = _queue(backend, name).event(routes=["r"])(recyclejobs.hoard.func)
    return [h.id for h in job.fire_many([(mb, str(runs), f"t{i:03}") for i in range(n)])]


def _settled(backend: BackendUnderTest, name: str, ids: list[str], timeout: float = 60) -> None:
    queue = _queue(backend, name)
    for job_id in ids:
        queue.handle(job_id).wait(timeout=timeout)


def test_max_jobs_per_child_replaces_workers_and_loses_or_charges_nothing(
        backend: BackendUnderTest, hoard: Path) -> None:
    name, runs, limit, n = backend.new_queue_name(), hoard / "runs", 4, 30
    ids = _fire_hoards(backend, name, runs, n, mb=0)
    # --prefetch 3: a worker due for replacement still holds claimed jobs, which must go back uncharged.
    pool = _pool(backend, name, hoard, ["--max-jobs-per-child", str(limit), "--prefetch", "3"])
    try:
        pool.wait_ready()
        _settled(backend, name, ids)
        pool.wait_ready()  # both workers replaced and registered again
        assert pool.process.poll() is None
    finally:
        pool.stop()
    rows = _runs(runs)
    assert sorted(token for token, _, _ in rows) == [f"t{i:03}" for i in range(n)]  # each exactly once
    per_pid = Counter(pid for _, pid, _ in rows)
    assert max(per_pid.values()) <= limit and len(per_pid) >= math.ceil(n / limit), per_pid
    store = backend.open(name)
    records = [store.get(job_id) for job_id in ids]
    store.close()
    assert all(r is not None and r.state == COMPLETE and r.attempts == 1 for r in records), \
        [(r.id, r.state, r.attempts) for r in records if r is not None and r.attempts != 1]
    assert "recycled" in pool.log() and "exited with status" not in pool.log(), pool.log()


def _running_on(runs: Path, pids: set[int]) -> set[int]:
    """The pids among ``pids`` that wrote a start line with no end line after it."""
    open_on: set[int] = set()
    for line in (runs.read_text().splitlines() if runs.exists() else []):
        kind, _, pid, _ = line.split()
        (open_on.add if kind == "start" else open_on.discard)(int(pid))
    return open_on & pids


def test_recycling_under_kill_9_of_replacements_and_a_signal_to_the_whole_group(
        backend: BackendUnderTest, hoard: Path) -> None:
    """SIGKILL each replacement worker as it appears, then SIGTERM the whole process group (a
    terminal's gentle stop) mid-recycling; a second pool finishes. Runs are stamped in a file."""
    import recyclejobs

    name, runs, n = backend.new_queue_name(), hoard / "runs", 24
    job = _queue(backend, name).event(routes=["r"])(recyclejobs.span.func)
    ids = [h.id for h in job.fire_many([(str(runs), f"t{i:03}", 0.15) for i in range(n)])]
    pool = _pool(backend, name, hoard, ["--max-jobs-per-child", "2", "--prefetch", "2"], lease=2.0,
                 new_session=True)
    killed: set[int] = set()
    seen: set[int] = set()
    try:
        pool.wait_ready(60)
        seen.update(pool.worker_pids())
        # Kill each replacement as it appears (4 of them), for at most 30 s on a loaded machine.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(killed) < 4:
            fresh = [pid for pid in pool.worker_pids() if pid not in seen]
            seen.update(fresh)
            if fresh:  # a replacement, just forked: kill it before or while it takes its first job
                with contextlib.suppress(ProcessLookupError):  # it did its two jobs and left already
                    os.kill(fresh[0], signal.SIGKILL)
                    killed.add(fresh[0])
            time.sleep(0.02)
        # Then the group signal while jobs run: longer ones fired now, and a start in the file with
        # no end yet on a worker still alive.
        ids += [h.id for h in job.fire_many([(str(runs), f"u{i:03}", 3.0) for i in range(4)])]
        # Looked at once per turn: a 0.15 s job seen running could end before a second look.
        deadline = time.monotonic() + 180  # behind the short jobs left, on a loaded machine
        while True:
            stopping = _running_on(runs, set(pool.worker_pids()) - killed)
            if stopping or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert stopping, "no job was running when the group signal was due: " + pool.log()
        pool.signal_group(signal.SIGTERM)
        assert pool.wait(30) == 0, pool.log()
    finally:
        pool.stop()
    assert killed, "no replacement worker appeared to kill: --max-jobs-per-child did not recycle"
    assert "Traceback" not in pool.log(), pool.log()
    finisher = _pool(backend, name, hoard, [], lease=2.0, log="finisher.log")
    try:
        _settled(backend, name, ids, timeout=90)
    finally:
        finisher.stop()
    starts: dict[str, list[tuple[float, int]]] = {}
    ends: dict[str, list[tuple[float, int]]] = {}
    for kind, token, pid, moment in (line.split() for line in runs.read_text().splitlines()):
        (starts if kind == "start" else ends).setdefault(token, []).append((float(moment), int(pid)))
    assert sorted(ends) == [f"t{i:03}" for i in range(n)] + [f"u{i:03}" for i in range(4)], \
        "a job never ran to its end"
    stopped_in_time: set[int] = set()
    for token, attempts in starts.items():
        finished = dict((pid, moment) for moment, pid in ends.get(token, []))
        for moment, pid in attempts:
            # An attempt that never ended was on a worker this test SIGKILLed; the gentle stop
            # let every other running job finish.
            assert pid in finished or pid in killed, (token, pid, killed, stopping)
            stopped_in_time.update({pid} & stopping & set(finished))
            for other, other_pid in attempts:  # never two attempts of one job at once
                if (other, other_pid) != (moment, pid) and pid in finished:
                    assert not moment < other < finished[pid], (token, attempts, ends.get(token))
        # A job runs to its end twice only if the first end was on a killed worker (its finish lost).
        assert all(pid in killed for _, pid in sorted(ends[token])[:-1]), (token, ends[token], killed)
    assert stopped_in_time == stopping  # the jobs running at the group signal finished
    store = backend.open(name)
    records = [store.get(job_id) for job_id in ids]
    store.close()
    assert all(r is not None and r.state == COMPLETE for r in records)


def test_max_memory_per_child_replaces_a_worker_that_grew_past_it(backend: BackendUnderTest, hoard: Path) -> None:
    # 25 MB a job; the limit halfway between two steps for the usual start of 35 MB (60, 85, 110).
    name, runs, n, mb, limit = backend.new_queue_name(), hoard / "runs", 12, 25, 97.5
    ids = _fire_hoards(backend, name, runs, n, mb=mb)
    pool = _pool(backend, name, hoard, ["--max-memory-per-child", str(limit)], concurrency=1)
    try:
        pool.wait_ready()
        _settled(backend, name, ids)
    finally:
        pool.stop()
    rows = _runs(runs)
    assert sorted(token for token, _, _ in rows) == [f"t{i:03}" for i in range(n)]
    by_pid: dict[int, list[float]] = {}
    for _, pid, rss in rows:
        by_pid.setdefault(pid, []).append(rss)
    assert len(by_pid) >= 2, by_pid
    # The job reads its size before it returns, the worker just after (the finish allocates a
    # little more): once, with a limit of 110, a job read 110.0 and its worker then found itself over.
    slack = 2.0
    for sizes in by_pid.values():
        # Replaced after the first job that left it over the limit, never before.
        assert all(size <= limit + slack for size in sizes[:-1]), by_pid
    finished = [sizes for pid, sizes in by_pid.items() if pid != rows[-1][1]]
    assert finished and all(sizes[-1] > limit - slack for sizes in finished), by_pid
    store = backend.open(name)
    assert all((r := store.get(job_id)) is not None and r.attempts == 1 for job_id in ids)
    store.close()


def test_burst_runs_every_due_job_then_exits_0(backend: BackendUnderTest, hoard: Path) -> None:
    name, runs = backend.new_queue_name(), hoard / "runs"
    ids = _fire_hoards(backend, name, runs, 20, mb=0)
    queue = _queue(backend, name)
    # A failing job retried at once must use up its attempts before the pool is done;
    # a long one on one worker keeps the pool until it ends; a job due later stays queued.
    failing = queue.event(routes=["r"], retries=2, retry_backoff=0)(jobs.fail.func).fire("again")
    napping = queue.event(routes=["r"])(jobs.nap.func).fire(1.5)
    later = queue.event(routes=["r"])(jobs.add.func).fire_at(timedelta(seconds=120), 1, 2)
    pool = _pool(backend, name, hoard, ["--burst"], concurrency=2)
    started = time.monotonic()
    assert pool.wait(60) == 0, pool.log()
    took = time.monotonic() - started
    assert sorted(token for token, _, _ in _runs(runs)) == [f"t{i:03}" for i in range(20)]
    assert all(queue.handle(job_id).state == COMPLETE for job_id in ids)
    assert napping.state == COMPLETE
    failed = queue.get(failing.id)
    assert failed is not None and failed.state == ERROR and failed.attempts == 3
    assert failed.error is not None and failed.error["type"] == "ValueError"
    assert later.state == PENDING
    assert queue.workers() == []  # every worker unregistered
    assert "no due job left" in pool.log() and took < 30, (took, pool.log())


def test_burst_on_an_empty_queue_exits_at_once(backend: BackendUnderTest, hoard: Path) -> None:
    pool = _pool(backend, backend.new_queue_name(), hoard, ["--burst"], concurrency=3)
    started = time.monotonic()
    assert pool.wait(90) == 0, pool.log()
    # A pool of three fresh interpreters, at load averages of 40 and more in a parallel run; a pool
    # that did not notice the empty queue would never exit at all.
    assert time.monotonic() - started < 45


def test_burst_with_async_jobs(backend: BackendUnderTest, hoard: Path, tmp_path: Path) -> None:
    name = backend.new_queue_name()
    anap = _queue(backend, name).event(routes=["r"])(jobs.anap.func)
    handles = anap.fire_many([(0.3,) for _ in range(8)])
    pool = PoolProcess(backend, name, ["r"], log_path=tmp_path / "async.log",
                       extra=["--burst", "--async-concurrency", "4"])
    assert pool.wait(60) == 0, pool.log()
    assert [h.state for h in handles] == [COMPLETE] * 8


def test_a_worker_that_stopped_ignores_a_late_interrupt(hoard: Path) -> None:
    """The pool may interrupt a job it still thinks is running after the worker finished it and
    stopped (a renewal answered "lost" before the pool read the finish). CPython puts SIGUSR1 back
    to its default action while it shuts down, so that late interrupt killed a recycled worker
    (status -10, logged as a crash and restarted). A worker ignores it once its loop is over."""
    backend = BackendUnderTest(name="sqlite", url=str(hoard / "q.db"))
    name, runs, disposition = backend.new_queue_name(), hoard / "runs", hoard / "disposition"
    ids = _fire_hoards(backend, name, runs, 6, mb=0)
    path = os.pathsep.join(filter(None, [str(hoard), os.environ.get("PYTHONPATH")]))
    pool = PoolProcess(backend, name, ["r"], concurrency=2, log_path=hoard / "pool.log",
                       imports=["recyclejobs", "skunkqueue.testing.jobs"],
                       extra=["--max-jobs-per-child", "1"], cwd=hoard,
                       env={"PYTHONPATH": path, "RECYCLE_DISPOSITION": str(disposition)})
    try:
        pool.wait_ready()
        _settled(backend, name, ids)
    finally:
        pool.stop()
    workers = {pid for _, pid, _ in _runs(runs)}
    seen = dict(line.split() for line in disposition.read_text().splitlines())
    assert len(workers) >= 6 and all(seen.get(str(pid)) == "True" for pid in workers), (workers, seen)
    assert "exited with status" not in pool.log(), pool.log()
