"""Kill and hand-back contracts that hold whatever the store, with real pools and signals.

* Once ``kill`` has returned, the job never starts again anywhere and ends
  ``killed`` - also when it was prefetched (claimed, not started) and when its
  worker stops renewing the lease.
* A prefetched job whose worker is stopped goes back to the queue soon after,
  and is not charged an attempt it never started.

Linux only: the tests pause workers with SIGSTOP and list them with pgrep.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from skunkqueue.queue import SkunkQueue
from skunkqueue.record import COMPLETE, KILLED, RUNNING
from skunkqueue.testing import jobs
from skunkqueue.testing.suite_support import declare, started, wait_until


class SupervisionSuite:
    """Mixed into :class:`~skunkqueue.testing.ConformanceSuite`."""

    def test_kill_of_a_prefetched_job_means_it_never_runs(self, queue: SkunkQueue, start_pool: Any,
                                                           tmp_path: Path) -> None:
        nap, mark = declare(queue, jobs.nap), declare(queue, jobs.mark)
        marker, log = tmp_path / "started", tmp_path / "executions"
        long = nap.fire(3.0, str(marker))
        short = [mark.fire(str(log), str(i)) for i in range(5)]
        start_pool(["r"], extra=["--prefetch", "16"])
        wait_until(lambda: started(marker), what="the long job to start")
        assert queue.kill(short[2]) in (RUNNING, KILLED)  # held by the worker, or already handed back
        assert long.wait(timeout=30) == "rested"
        for i, handle in enumerate(short):
            if i != 2:
                handle.wait(timeout=30)
        wait_until(lambda: short[2].state == KILLED, timeout=15, what="the killed job to end killed")
        time.sleep(1.0)
        assert short[2].state == KILLED
        assert sorted(log.read_text().split()) == ["0", "1", "3", "4"]

    def test_kill_then_lost_lease_never_runs_again(self, queue: SkunkQueue, start_pool: Any,
                                                   tmp_path: Path) -> None:
        first = start_pool(["r"], lease=1.5)
        [paused] = first.worker_pids()
        marker = tmp_path / "starts"
        handle = declare(queue, jobs.nap).fire(4.0, str(marker))
        wait_until(lambda: started(marker), what="the job to start")
        os.kill(paused, signal.SIGSTOP)
        try:
            assert queue.kill(handle) == RUNNING
            # The stopped worker renews nothing: the lease runs out, and the
            # kill request outranks the lost lease's way back to the queue.
            wait_until(lambda: handle.state == KILLED, timeout=20, what="the job to end killed")
            start_pool(["r"], lease=1.5)
            time.sleep(2.0)
        finally:
            os.kill(paused, signal.SIGCONT)
        time.sleep(1.0)
        record = queue.get(handle.id)
        assert record is not None and record.state == KILLED and record.result is None
        assert marker.read_text().count("start") == 1

    def test_prefetched_jobs_behind_a_stopped_worker_go_back_uncharged(
            self, queue: SkunkQueue, start_pool: Any, tmp_path: Path) -> None:
        nap, mark = declare(queue, jobs.nap), declare(queue, jobs.mark)
        marker, log = tmp_path / "started", tmp_path / "executions"
        nap.fire(30.0, str(marker))
        held = [mark.fire(str(log), str(i)) for i in range(4)]
        first = start_pool(["r"], extra=["--prefetch", "8"])
        [paused] = first.worker_pids()
        wait_until(lambda: started(marker), what="the long job to start")
        os.kill(paused, signal.SIGSTOP)
        try:
            started_at = time.monotonic()
            start_pool(["r"])
            for handle in held:
                handle.wait(timeout=20)
            # Far sooner than the 30 s lease the stopped worker took them under.
            assert time.monotonic() - started_at < 15
        finally:
            os.kill(paused, signal.SIGCONT)
        for handle in held:
            record = queue.get(handle.id)
            assert record is not None and (record.state, record.attempts) == (COMPLETE, 1)
        assert sorted(log.read_text().split()) == ["0", "1", "2", "3"]
        # Running again, the first worker naps on for the rest of its 30 s; a gentle stop (the
        # fixture's) would wait for that, so this pool stops roughly.
        first.signal(signal.SIGINT)
        first.wait(30)
