"""Worker supervision against hostile jobs and signals, on every backend.

* A job holding the GIL keeps its lease (the pool renews it), and its time
  limit is hard: the worker is killed at ``timeout + grace`` and the attempt
  recorded as ``TimeoutError``; a fresh worker takes over the route.
* A job that swallows every interruption is still stopped: by a kill request,
  by a rough stop (after ``--grace``) and at a second SIGINT; it ends
  ``killed`` and never runs again.
* Gentle signals to the whole process group (a terminal's SIGTERM or SIGHUP)
  never hang the pool.
* Whatever a job raises (``sys.exit``, ``KeyboardInterrupt``, an unencodable
  result, an exception at import) is recorded on that attempt, with retries as
  configured, and the worker process survives.

Executions are counted in a file outside the queue.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import hostile_jobs
import pytest
from conftest import Figures, PoolStarter
from reliability_support import executions, wait_until

from skunkqueue.errors import JobFailed
from skunkqueue.persistence import Persistence
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import COMPLETE, ERROR, KILLED, JobRecord, new_id
from skunkqueue.testing.kit import BackendUnderTest

GRACE = 1.5
# Rounds of group signals. The race they hunt (a second signal landing while the pool or a worker
# handles the first) is in core's signal handling, the same code on every backend: SQLite, which
# needs no server and starts pools fastest, runs 20 rounds; a server backend runs 10, which still
# signals its workers inside each store's own blocking wait (the second worker has usually gone idle) with
# SIGTERM and SIGHUP five times each: 60 rounds a run in all. A round is a pool of three
# interpreters started, about 1 CPU-s: SQLite's 50 rounds were 51 CPU-s and 130 s of a CI run.
# `make chaos` (SKUNQ_CHAOS=long) runs 50 on every backend; SKUNQ_SIGNAL_ROUNDS sets every
# backend's count (`make test-fast`: 10).
CORE_ROUNDS, SERVER_ROUNDS, LONG_ROUNDS = 20, 10, 50


def signal_rounds(backend: str) -> int:
    if os.environ.get("SKUNQ_SIGNAL_ROUNDS"):
        return int(os.environ["SKUNQ_SIGNAL_ROUNDS"])
    if os.environ.get("SKUNQ_CHAOS") == "long":
        return LONG_ROUNDS
    return CORE_ROUNDS if backend == "sqlite" else SERVER_ROUNDS


def _started(log: Path, token: str) -> bool:
    return bool(executions(log).get(token))


def test_a_job_holding_the_gil_keeps_its_lease(queue: SkunkQueue, start_pool: PoolStarter,
                                               tmp_path: Path, figures: Figures) -> None:
    log = tmp_path / "executions"
    pool = start_pool(["a"], concurrency=2, lease=1.5)
    hold = queue.event(routes=["a"])(hostile_jobs.hold_gil.func)
    handle = hold.fire(str(log), "hog", 5.0)
    assert handle.wait(timeout=40) == "held"
    record = queue.get(handle.id)
    assert record is not None and (record.state, record.attempts, record.token) == (COMPLETE, 1, 1)
    assert len(executions(log)["hog"]) == 1, "a second worker took the job while the first held the GIL"
    assert "lease lost" not in pool.log()
    figures.record("gil-held-past-lease", fired=1, duplicates=len(executions(log)["hog"]) - 1,
                   held_s=5.0, lease_s=1.5)


def test_a_long_regex_is_interrupted_at_its_time_limit(queue: SkunkQueue, start_pool: PoolStarter,
                                                       tmp_path: Path, figures: Figures) -> None:
    log = tmp_path / "executions"
    start_pool(["a"], concurrency=2, lease=3.0, extra=["--grace", str(GRACE)])
    regex = queue.event(routes=["a"], timeout=2)(hostile_jobs.catastrophic_regex.func)
    fired = time.monotonic()
    handle = regex.fire(str(log), "regex", 28)  # ~40 s of backtracking in C here
    with pytest.raises(JobFailed) as info:
        handle.wait(timeout=60)
    took = time.monotonic() - fired
    assert info.value.error_type == "TimeoutError" and "time limit of 2 s" in str(info.value)
    assert took < 2 + GRACE + 3, f"the attempt ended {took:.1f} s after it was fired"
    record = queue.get(handle.id)
    assert record is not None and (record.state, record.attempts) == (ERROR, 1)
    assert len(executions(log)["regex"]) == 1
    figures.record("regex-time-limit", fired=1, duplicates=0, timeout_s=2, ended_after_s=round(took, 2))


def test_the_time_limit_is_hard_for_a_job_that_ignores_interrupts(
        queue: SkunkQueue, start_pool: PoolStarter, tmp_path: Path, figures: Figures) -> None:
    log = tmp_path / "executions"
    pool = start_pool(["a"], concurrency=2, lease=3.0, extra=["--grace", str(GRACE)])
    before = set(pool.worker_pids())
    hog = queue.event(routes=["a"], timeout=2)(hostile_jobs.unresponsive.func)
    fired = time.monotonic()
    handle = hog.fire(str(log), "hog", 60)
    with pytest.raises(JobFailed) as info:
        handle.wait(timeout=60)
    took = time.monotonic() - fired
    assert info.value.error_type == "TimeoutError" and "its worker was killed" in str(info.value)
    assert 2 + GRACE - 0.5 < took < 2 + GRACE + 3, f"the attempt ended {took:.1f} s after it was fired"
    record = queue.get(handle.id)
    assert record is not None and (record.state, record.attempts) == (ERROR, 1)
    assert len(executions(log)["hog"]) == 1
    # The killed worker was replaced at once: the route has two workers again.
    wait_until(lambda: len(pool.worker_pids()) == 2 and set(pool.worker_pids()) != before, timeout=15,
               what="a fresh worker")
    after = queue.event(routes=["a"])(hostile_jobs.pid.func).fire(str(log), "after")
    assert after.wait(timeout=20) in pool.worker_pids()
    figures.record("hard-time-limit", fired=2, duplicates=0, timeout_s=2, grace_s=GRACE,
                   ended_after_s=round(took, 2))


def test_kill_stops_a_job_that_swallows_interrupts(queue: SkunkQueue, start_pool: PoolStarter,
                                                   tmp_path: Path, figures: Figures) -> None:
    log = tmp_path / "executions"
    start_pool(["a"], extra=["--grace", str(GRACE)])
    stubborn = queue.event(routes=["a"])(hostile_jobs.swallow_everything.func)
    handle = stubborn.fire(str(log), "stubborn")
    wait_until(lambda: _started(log, "stubborn"), what="the job to start")
    asked = time.monotonic()
    queue.kill(handle)
    wait_until(lambda: handle.state == KILLED, timeout=GRACE + 10, what="the job to end killed")
    took = time.monotonic() - asked
    assert "stubborn-swallowed" in log.read_text(), "the job never saw the interrupt it swallowed"
    time.sleep(2.0)
    assert handle.state == KILLED and len(executions(log)["stubborn"]) == 1
    figures.record("kill-swallowing-job", fired=1, duplicates=0, grace_s=GRACE, killed_after_s=round(took, 2))


@pytest.mark.parametrize("how", ["grace", "second-sigint"])
def test_a_rough_stop_always_ends(how: str, queue: SkunkQueue, start_pool: PoolStarter, tmp_path: Path,
                                  figures: Figures) -> None:
    log = tmp_path / "executions"
    grace = GRACE if how == "grace" else 120.0
    pool = start_pool(["a"], extra=["--grace", str(grace)])
    handle = queue.event(routes=["a"])(hostile_jobs.swallow_everything.func).fire(str(log), "stubborn")
    wait_until(lambda: _started(log, "stubborn"), what="the job to start")
    asked = time.monotonic()
    pool.signal(signal.SIGINT)
    if how == "second-sigint":
        wait_until(lambda: "stubborn-swallowed" in log.read_text(), what="the first interrupt to be swallowed")
        pool.signal(signal.SIGINT)
    assert pool.wait(GRACE + 15) == 130
    took = time.monotonic() - asked
    assert took < GRACE + 10
    record = queue.get(handle.id)
    assert record is not None and record.state == KILLED
    start_pool(["a"])
    time.sleep(2.0)
    assert handle.state == KILLED and len(executions(log)["stubborn"]) == 1
    figures.record(f"rough-stop-{how}", fired=1, duplicates=0, stopped_after_s=round(took, 2))


# Up to 50 pools started one after another: on a busy 2-core machine a pool of 2 workers importing
# psycopg takes about 5 s to start, which alone passes pytest.ini's 300 s.
@pytest.mark.chaos
@pytest.mark.timeout(900)
def test_group_signals_never_hang_the_pool(queue: SkunkQueue, start_pool: PoolStarter, tmp_path: Path,
                                           backend: BackendUnderTest, figures: Figures) -> None:
    rounds = signal_rounds(backend.name)
    log = tmp_path / "executions"
    mark = queue.event(routes=["a"])(hostile_jobs.pid.func)
    nap = queue.event(routes=["a"])(hostile_jobs.hold_gil.func)  # a short GIL hold widens the window
    handles = []
    hangs = 0
    for round_ in range(rounds):
        sig = signal.SIGTERM if round_ % 2 == 0 else signal.SIGHUP
        pool = start_pool(["a"], concurrency=2, new_session=True)
        first = nap.fire(str(log), f"r{round_}-a", 0.3)
        second = mark.fire(str(log), f"r{round_}-b")
        handles += [first, second]
        wait_until(lambda r=round_: _started(log, f"r{r}-a"), what="a job to start")
        pool.signal_group(sig)
        time.sleep(0.01)
        pool.signal_group(sig)  # a second one while the first is being handled
        try:
            assert pool.wait(20) == 0
        except subprocess.TimeoutExpired:
            hangs += 1
            pool.signal_group(signal.SIGKILL)
    assert hangs == 0, f"{hangs} of {rounds} pools hung after a group signal"
    # The jobs that had started finished (gentle); the rest wait for a worker.
    start_pool(["a"])
    for handle in handles:
        handle.wait(timeout=30)
    runs = executions(log)
    assert all(len(runs[token]) == 1 for token in runs), "a job ran twice"
    figures.record("group-signals", rounds=rounds, hangs=hangs, fired=len(handles),
                   duplicates=sum(len(v) - 1 for v in runs.values()))


def _enqueue_raw(store: Persistence, queue: SkunkQueue, func: str, route: str = "a") -> JobRecord:
    now = time.time()
    record = JobRecord(id=new_id(), queue=queue.name, route=route, func=func, payload=b"[[],{}]",
                       due=now, created=now)
    store.enqueue([record])
    return record


def test_whatever_a_job_raises_is_recorded_and_the_worker_survives(
        queue: SkunkQueue, start_pool: PoolStarter, tmp_path: Path, figures: Figures) -> None:
    log = tmp_path / "executions"
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "broken_at_import.py").write_text('raise RuntimeError("boom at import")\n')
    pool = start_pool(["a"])
    [worker] = pool.worker_pids()
    # Bare mode (no --import): the worker imports a record's module on demand from its --path roots.
    bare = start_pool(["b"], imports=[], extra=["--path", str(modules)])
    event = queue.event
    cases = [
        (event(routes=["a"], retries=1, retry_backoff=0.01)(hostile_jobs.exit_process.func)
         .fire(str(log), "exit0", 0), "SystemExit", "0", 2),
        (event(routes=["a"])(hostile_jobs.exit_process.func).fire(str(log), "exit3", 3), "SystemExit", "3", 1),
        (event(routes=["a"])(hostile_jobs.interrupt_keyboard.func).fire(str(log), "ctrl-c"),
         "KeyboardInterrupt", "from the job", 1),
        (event(routes=["a"])(hostile_jobs.deep_result.func).fire(str(log), "deep"),
         "SerializationError", "nested too deeply", 1),
    ]
    broken = _enqueue_raw(queue.persistence, queue, "broken_at_import:job", route="b")
    for handle, kind, words, attempts in cases:
        with pytest.raises(JobFailed) as info:
            handle.wait(timeout=30)
        assert info.value.error_type == kind and words in str(info.value), str(info.value)
        record = queue.get(handle.id)
        assert record is not None and (record.state, record.attempts) == (ERROR, attempts)
    done = queue.persistence.wait_finished(broken.id, 30)
    assert done is not None and done.state == ERROR and done.error is not None
    assert done.error["type"] == "RuntimeError" and "boom at import" in done.error["message"]
    assert "broken_at_import.py" in done.error["traceback"]
    # Same worker processes throughout, and they still work.
    assert pool.worker_pids() == [worker] and len(bare.worker_pids()) == 1
    assert "exited with status" not in pool.log() + bare.log()
    ok = event(routes=["a"])(hostile_jobs.pid.func).fire(str(log), "after")
    assert ok.wait(timeout=20) == worker
    runs = executions(log)
    assert [len(runs[t]) for t in ("exit0", "exit3", "ctrl-c", "deep")] == [2, 1, 1, 1]
    assert "error (SystemExit: 3)" in pool.log(), "the job's log line names the exception"
    figures.record("hostile-failures", fired=6, worker_restarts=0, duplicates=0)


# -- from the hostile review of the new supervision ----------------------------------


def test_an_exception_that_cannot_print_itself_is_recorded(queue: SkunkQueue, start_pool: PoolStarter,
                                                           tmp_path: Path) -> None:
    log = tmp_path / "executions"
    pool = start_pool(["a"])
    [worker] = pool.worker_pids()
    handle = queue.event(routes=["a"])(hostile_jobs.broken_str.func).fire(str(log), "bad-str")
    with pytest.raises(JobFailed) as info:
        handle.wait(timeout=30)
    assert info.value.error_type == "_Unprintable" and "cannot be shown" in str(info.value)
    assert pool.worker_pids() == [worker] and len(executions(log)["bad-str"]) == 1


def test_a_job_that_resets_the_interrupt_signal_still_ends_with_its_time_limit(
        queue: SkunkQueue, start_pool: PoolStarter, tmp_path: Path) -> None:
    log = tmp_path / "executions"
    start_pool(["a"], extra=["--grace", str(GRACE)])
    job = queue.event(routes=["a"], timeout=1)(hostile_jobs.reset_signal.func)
    handle = job.fire(str(log), "usr1", "SIGUSR1", "SIG_DFL", 30.0)  # the interrupt now kills the worker
    with pytest.raises(JobFailed) as info:
        handle.wait(timeout=30)
    assert info.value.error_type == "TimeoutError"
    record = queue.get(handle.id)
    assert record is not None and (record.state, record.attempts) == (ERROR, 1)
    assert len(executions(log)["usr1"]) == 1


@pytest.mark.parametrize("to", ["SIG_IGN", "SIG_DFL"])
def test_a_gentle_stop_survives_a_job_that_changed_the_stop_signal(
        to: str, queue: SkunkQueue, start_pool: PoolStarter, tmp_path: Path) -> None:
    log = tmp_path / "executions"
    pool = start_pool(["a"])
    job = queue.event(routes=["a"])(hostile_jobs.reset_signal.func)
    assert job.fire(str(log), "meddler", "SIGTERM", to).wait(timeout=20) == "reset"
    innocent = queue.event(routes=["a"])(hostile_jobs.timed.func).fire(str(log), "innocent", 1.5)
    wait_until(lambda: _started(log, "innocent-start"), what="the next job to start")
    pool.signal(signal.SIGTERM)
    assert pool.wait(20) == 0
    assert innocent.state == COMPLETE, "the job after the meddler was cut short by the gentle stop"


def test_a_route_name_with_spaces_keeps_its_leases(backend: BackendUnderTest, queue: SkunkQueue,
                                                   start_pool: PoolStarter, tmp_path: Path) -> None:
    log = tmp_path / "executions"
    route = "night shift\tand \n more"
    # The lease is renewed at least twice during the job; 3 s of it leaves room for a renewal held
    # up by a loaded machine (at 1.5 s the FDB stand-in's lease once ran out under CI's load).
    start_pool([route], lease=3.0)
    handle = queue.event(routes=[route])(hostile_jobs.timed.func).fire(str(log), "spaced", 7.0)
    assert handle.wait(timeout=40) == "done"
    record = queue.get(handle.id)
    assert record is not None and (record.attempts, record.token) == (1, 1)
    assert len(executions(log)["spaced-start"]) == 1


def test_a_job_that_forks_leaves_no_second_worker(queue: SkunkQueue, start_pool: PoolStarter,
                                                  tmp_path: Path) -> None:
    log = tmp_path / "executions"
    pool = start_pool(["a"])
    [worker] = pool.worker_pids()
    assert queue.event(routes=["a"])(hostile_jobs.fork_and_return.func).fire(str(log), "fork").wait(20) == worker
    pid = queue.event(routes=["a"])(hostile_jobs.pid.func)
    assert {pid.fire(str(log), f"after-{i}").wait(timeout=20) for i in range(6)} == {worker}


def test_a_stopped_pool_never_lets_a_job_run_twice_at_once(queue: SkunkQueue, start_pool: PoolStarter,
                                                           tmp_path: Path, figures: Figures) -> None:
    log = tmp_path / "executions"
    first = start_pool(["a"], lease=2.0)
    handle = queue.event(routes=["a"])(hostile_jobs.timed.func).fire(str(log), "once", 6.0)
    wait_until(lambda: _started(log, "once-start"), what="the job to start")
    os.kill(first.pid, signal.SIGSTOP)  # the pool, not the worker: nobody renews the lease now
    try:
        start_pool(["a"], lease=2.0)
        assert handle.wait(timeout=40) == "done"
    finally:
        os.kill(first.pid, signal.SIGCONT)
    runs = sorted((float(line.split()[1].split(":")[0]), line.split()[0]) for line in log.read_text().splitlines())
    starts = [at for at, what in runs if what == "once-start"]
    ends = [at for at, what in runs if what == "once-end"]
    assert len(starts) == 2 and len(ends) == 2
    assert ends[0] <= starts[1], "the stale run was still going when the job ran again"
    figures.record("stopped-pool", fired=1, overlapping_runs=0, runs=2)


def test_the_worker_of_a_stopped_pool_claims_nothing(queue: SkunkQueue, start_pool: PoolStarter,
                                                     tmp_path: Path, figures: Figures) -> None:
    # Nobody renews what the worker of a silent pool claims: each such claim would run out
    # and cost the job an attempt (five made one job a dead letter without ever running it).
    log = tmp_path / "executions"
    first = start_pool(["a"], lease=2.0)
    [stopped_worker] = first.worker_pids()
    os.kill(first.pid, signal.SIGSTOP)  # the pool only: its worker stays idle on the route
    try:
        time.sleep(2.0)  # past two thirds of the lease without a pulse
        second = start_pool(["a"], lease=2.0)
        timed = queue.event(routes=["a"])(hostile_jobs.timed.func)
        handles = [timed.fire(str(log), f"job{n}", 0.05) for n in range(10)]
        for handle in handles:
            assert handle.wait(timeout=30) == "done"
        time.sleep(1.0)  # let a late claim by the stopped pool's worker show
    finally:
        os.kill(first.pid, signal.SIGCONT)
    runners = {int(line.rsplit(":", 1)[1]) for line in log.read_text().splitlines()}
    assert stopped_worker not in runners and runners <= set(second.worker_pids()), runners
    attempts = [record.attempts for record in (queue.get(h.id) for h in handles) if record is not None]
    assert attempts == [1] * len(handles), attempts
    assert "lease lost" not in first.log(), first.log()
    figures.record("stopped-pool-idle", fired=len(handles), runs=len(handles), charged_without_running=0)


def test_a_job_its_worker_gave_up_on_is_charged_when_that_worker_dies(
        queue: SkunkQueue, start_pool: PoolStarter, tmp_path: Path, figures: Figures) -> None:
    # Found in the workflow chaos run (issue 24): a pool too busy to renew for two thirds of the
    # lease makes its worker stop the job and discard the outcome ("lease lost") although the
    # store still holds the job under that worker's token. When the worker then died, the pool
    # took the job for one claimed and never reported, and handed it back without charging the
    # attempt: it ran twice with attempts == 1 ("w42.b2 ran 2 times, claimed 1").
    # Here the pool is SIGSTOPped (silent) instead of busy, and resumed only after its worker is
    # SIGKILLed, so it learns of the discarded run and of the death in the same look.
    lease = 9.0  # the worker gives up after 6 s of silence; the lease lasts at least 8 s after the stop
    log = tmp_path / "executions"
    pool = start_pool(["a"], lease=lease)
    [worker] = pool.worker_pids()
    handle = queue.event(routes=["a"])(hostile_jobs.stall_first_start.func).fire(str(log), 120.0)
    wait_until(log.exists, what="the first start")
    os.kill(pool.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: "outcome discarded" in pool.log(), timeout=lease * 2,
                   what="the worker of the silent pool to give up on the job")
        record = queue.get(handle.id)
        assert record is not None and record.state == "running" and record.attempts == 1, record
        os.kill(worker, signal.SIGKILL)
    finally:
        os.kill(pool.pid, signal.SIGCONT)
    assert handle.wait(timeout=60) == 2, "the second start was not counted as the second attempt"
    starts = [json.loads(line) for line in log.read_text().splitlines()]
    record = queue.get(handle.id)
    assert record is not None
    assert [s["attempt"] for s in starts] == [1, 2] and record.attempts == 2, (starts, record.attempts)
    figures.record("gave-up-job", fired=1, runs=len(starts), attempts=record.attempts, worker_kills=1)
