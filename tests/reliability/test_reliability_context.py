"""``skunkqueue.current_job()`` inside real workers, and the fencing-token guard of examples/fencing.py.

* Through retries a job sees its attempt number rise and its token with it,
  with the key, time limit and attempts allowed it was fired with.
* After a lost lease the attempt that took over has a higher token, and the
  guarded write of the stale attempt cannot overwrite the newer one.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import hostile_jobs
import pytest
from conftest import Figures, PoolStarter
from reliability_support import wait_until

from skunkqueue.queue import SkunkQueue

EXAMPLES = str(Path(__file__).resolve().parents[2] / "examples")


def test_current_job_through_retries(queue: SkunkQueue, start_pool: PoolStarter, tmp_path: Path) -> None:
    if not queue.persistence.supports_keys:
        pytest.skip(f"the {queue.persistence.name} backend does not support idempotency keys yet")
    log = tmp_path / "contexts"
    start_pool(["a"])
    job = queue.event(routes=["a"], retries=2, retry_backoff=0.01, timeout=30)(hostile_jobs.context_log.func)
    fired = time.time()
    handle = job.fire(str(log), 2, key="ctx-key")
    assert handle.wait(timeout=30) == 3
    seen = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(c["attempt"], c["token"]) for c in seen] == [(1, 1), (2, 2), (3, 3)]
    for ctx in seen:
        assert (ctx["id"], ctx["queue"], ctx["route"], ctx["key"]) == (handle.id, queue.name, "a", "ctx-key")
        assert ctx["function"] == job.name and ctx["attempts_allowed"] == 3
        assert fired + 29 < ctx["deadline"] < time.time() + 31
        assert ctx["lease_until"] > fired


def test_a_stale_attempt_cannot_overwrite_through_the_fencing_guard(
        queue: SkunkQueue, start_pool: PoolStarter, tmp_path: Path, figures: Figures) -> None:
    log, db_path = tmp_path / "tokens", str(tmp_path / "invoices.db")
    first = start_pool(["a"], lease=1.5, extra=["--path", EXAMPLES])
    [paused] = first.worker_pids()
    job = queue.event(routes=["a"])(hostile_jobs.fenced_write.func)
    handle = job.fire(str(log), db_path, "inv-1", 2.0)
    wait_until(lambda: log.exists() and log.read_text().strip(), what="the first attempt to start")
    os.kill(paused, signal.SIGSTOP)
    try:
        start_pool(["a"], lease=1.5, extra=["--path", EXAMPLES])
        assert handle.wait(timeout=40) == 2
    finally:
        os.kill(paused, signal.SIGCONT)
    time.sleep(3.0)  # the stale attempt wakes up and tries to write (or is told to stop first)
    tokens = [int(line.split()[0]) for line in log.read_text().splitlines()]
    assert tokens == [1, 2]
    with sqlite3.connect(db_path) as db:
        assert db.execute("SELECT status, token FROM invoices WHERE id='inv-1'").fetchone() == ("attempt 2", 2)
    figures.record("fencing-guard", fired=1, attempts=2, stale_writes_refused=1)
