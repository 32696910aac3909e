"""The pool's stop reaches an idle worker whose stop signal is lost, sync or async.

The pool sends its stop both ways: SIGTERM and a line on the worker's pipe. A signal can be
lost (a job module that ignores SIGTERM when it is imported, or a worker the fork server has
just forked, which ignores it until it is taken: see test_forkserver.py); the pipe then
carries it, and the async worker's loop must read it as the sync one's does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pools
import pytest

from skunkqueue.testing.suite_support import wait_until


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_pool_stops_an_idle_worker_that_ignores_sigterm(tmp_path: Path, kind: str) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "deaf.py").write_text(textwrap.dedent("""
        import os, signal
        from skunkqueue import SkunkQueue

        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # at import: the worker has no job to undo it after
        queue = SkunkQueue("deaf", conn_url=os.environ["DEAF_DB"])

        @queue.event(routes=["r"])
        async def nothing():
            pass
    """))
    db = tmp_path / "deaf.db"
    log = tmp_path / "pool.log"
    args = ["-q", "deaf", "-r", "r", "--url", str(db), "--path", str(jobs), "--import", "deaf",
            *(["--async-concurrency", "4"] if kind == "async" else [])]
    with pools.running(args, cwd=tmp_path, env={**os.environ, "DEAF_DB": str(db)}, log=log) as pool:
        wait_until(lambda: b"listening on queue" in log.read_bytes(), timeout=30, what="the worker to listen")
        time.sleep(0.3)  # idle, waiting for work
        started = time.monotonic()
        pool.send_signal(signal.SIGTERM)
        try:
            code = pool.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the pool did not stop within 10 s:\n{log.read_text()[-3000:]}")
        assert code == 0, log.read_text()[-3000:]
        # The pipe is read at the loop's next turn: within the store's idle wait (1 s), not a grace period.
        assert time.monotonic() - started < 3, f"the stop took {time.monotonic() - started:.1f} s"
