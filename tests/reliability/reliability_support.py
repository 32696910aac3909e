"""Small helpers shared by the reliability tests."""

from __future__ import annotations

import collections
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

from skunkqueue.persistence import Persistence
from skunkqueue.record import FINISHED_STATES, JobRecord
from skunkqueue.testing.workers import PoolProcess, pid_alive


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
               every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def finished_count(store: Persistence) -> int:
    return sum(n for (_route, state), n in store.counts().items() if state in FINISHED_STATES)


def wait_all_finished(store: Persistence, expected: int, timeout: float, what: str = "every job") -> None:
    def done() -> bool:
        try:
            return finished_count(store) >= expected
        except Exception:  # a store coming back after a restart; keep asking
            return False
    wait_until(done, timeout, f"{what} to finish ({expected} expected)", every=0.2)


def executions(path: Path) -> dict[str, list[str]]:
    """token -> the executions (``pid:nonce``) the ``mark`` job logged for it."""
    runs: dict[str, list[str]] = collections.defaultdict(list)
    if path.exists():
        for line in path.read_text().splitlines():
            token, execution = line.split()
            runs[token].append(execution)
    return runs


def all_records(store: Persistence, routes: list[str]) -> list[JobRecord]:
    records: list[JobRecord] = []
    for route in routes:
        records += store.list_jobs(route=route, limit=10**7)
    return records


def check_outcomes(records: list[JobRecord], tokens: dict[str, str], runs: dict[str, list[str]],
                   serializer_loads: Callable[[bytes], Any]) -> dict[str, int]:
    """Every fired job (record id -> token) has exactly one finished record whose
    recorded result is one of the executions logged for it. Returns the figures."""
    by_id = {r.id: r for r in records}
    lost = [job_id for job_id in tokens if job_id not in by_id]
    unfinished = [r.id for r in records if r.id in tokens and r.state != "complete"]
    foreign_results = []
    for job_id, token in tokens.items():
        record = by_id.get(job_id)
        if record is None or record.state != "complete" or record.result is None:
            continue
        if serializer_loads(record.result) not in runs.get(token, []):
            foreign_results.append(job_id)
    never_ran = [t for t in tokens.values() if not runs.get(t)]
    duplicates = sum(len(runs[t]) - 1 for t in tokens.values() if len(runs.get(t, [])) > 1)
    jobs_run_twice = sum(1 for t in tokens.values() if len(runs.get(t, [])) > 1)
    strangers = set(runs) - set(tokens.values())
    assert not lost, f"{len(lost)} fired jobs have no record at all: {lost[:5]}"
    assert not unfinished, f"{len(unfinished)} jobs did not complete: " + "; ".join(
        f"{r.id} {r.state} {r.error}" for r in records if r.id in unfinished[:5])
    assert not never_ran, f"{len(never_ran)} jobs completed without their side effect: {never_ran[:5]}"
    assert not foreign_results, f"recorded results that no execution produced: {foreign_results[:5]}"
    assert not strangers, f"executions of tokens nobody fired: {sorted(strangers)[:5]}"
    return {"fired": len(tokens), "lost": len(lost) + len(unfinished), "duplicates": duplicates,
            "jobs_run_more_than_once": jobs_run_twice,
            "executions": sum(len(v) for v in runs.values())}


def kill_process(pid: int, sig: int = signal.SIGKILL) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def live_worker_pids(pool: PoolProcess) -> list[int]:
    return [p for p in pool.worker_pids() if pid_alive(p)]
