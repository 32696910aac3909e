"""A job's history: one entry per ended attempt, written by the finish that ends it.

* Each finish that ends an attempt appends that attempt's entry (worker id,
  host, pid, started, finished, outcome, error) in the same atomic step: a
  fenced-off (stale) finish appends nothing, and a replayed one appends once.
* An attempt whose worker vanished shows as ``lost``, whether the pool saw its
  worker die or the lease ran out and housekeeping took the job back.
* The last ``HISTORY_LIMIT`` entries are kept; ``history_dropped`` counts the rest.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from skunkqueue import housekeeping, policy
from skunkqueue.cli import main as cli_main
from skunkqueue.persistence import Persistence
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import COMPLETE, HISTORY_LIMIT, KILLED, PENDING, Outcome
from skunkqueue.testing import jobs
from skunkqueue.testing.kit import BackendUnderTest
from skunkqueue.testing.suite_support import declare, make_record, wait_until
from skunkqueue.testing.workers import pid_alive

BOOM = {"type": "ValueError", "message": "boom", "traceback": "Traceback (most recent call last):\n  boom\n"}


def _retry_now(claimed: Any) -> Outcome:
    """A failed attempt handed back due at once (policy.failed would back off)."""
    return Outcome(PENDING, error=dict(BOOM), due=time.time()).ending(claimed)


class HistorySuite:
    """Mixed into :class:`~skunkqueue.testing.ConformanceSuite`."""

    # -- the protocol, in this process -------------------------------------------------

    def test_each_ended_attempt_is_one_entry_and_the_cap_counts_the_dropped(
            self, store: Persistence, queue_name: str) -> None:
        record = make_record(queue_name, retries=100)
        store.enqueue([record])
        failures = HISTORY_LIMIT + 3
        for n in range(1, failures + 1):
            [claimed] = store.claim("r", f"host{n}:{1000 + n}:r:ab", 10)
            if n % 2:  # both ways a worker records an outcome
                assert store.finish(record.id, claimed.token, _retry_now(claimed))
            else:
                done, _ = store.finish_and_claim(record.id, claimed.token, _retry_now(claimed), "other", "x", 10)
                assert done
        [last] = store.claim("r", "last-host:77:r:cd", 10)
        assert store.finish(record.id, last.token, policy.completed(b"1").ending(last))
        final = store.get(record.id)
        assert final is not None and final.state == COMPLETE and final.attempts == failures + 1
        assert len(final.history) == HISTORY_LIMIT and final.history_dropped == failures + 1 - HISTORY_LIMIT
        kept = range(failures + 2 - HISTORY_LIMIT, failures + 2)
        assert [e["attempt"] for e in final.history] == list(kept)
        for entry, n in zip(final.history[:-1], kept):
            assert (entry["worker"], entry["host"], entry["pid"]) == (f"host{n}:{1000 + n}:r:ab", f"host{n}", 1000 + n)
            assert (entry["outcome"], entry["error_type"], entry["message"]) == ("error", "ValueError", "boom")
            assert entry["traceback"] == BOOM["traceback"]
            assert entry["started"] <= entry["finished"] + 1  # stamps of one clock, or of two within tolerance
        ended = final.history[-1]
        assert (ended["outcome"], ended["worker"], ended["host"], ended["pid"], ended["error_type"]) == (
            COMPLETE, "last-host:77:r:cd", "last-host", 77, None)
        assert ended["started"] == last.started and abs(ended["finished"] - (final.finished or 0)) < 1

    def test_a_stale_finish_adds_nothing_and_a_replayed_one_adds_once(self, store: Persistence,
                                                                      queue_name: str) -> None:
        record = make_record(queue_name)
        store.enqueue([record])
        [first] = store.claim("r", "gone:41:r:aa", 0.3)
        time.sleep(0.4)
        assert housekeeping.recover_expired_leases(store) == 1
        taken_back = store.get(record.id)
        assert taken_back is not None and [e["outcome"] for e in taken_back.history] == ["lost"]
        lost = taken_back.history[0]
        assert (lost["worker"], lost["pid"], lost["attempt"], lost["error_type"]) == (
            "gone:41:r:aa", 41, 1, "LeaseLost")
        [second] = store.claim("r", "here:42:r:bb", 10)
        # The first worker wakes up and reports: fenced off, it records nothing (twice over).
        assert not store.finish(record.id, first.token, policy.completed(b"stale").ending(first))
        assert not store.finish_and_claim(record.id, first.token, policy.completed(b"stale").ending(first),
                                          "r", "gone:41:r:aa", 10)[0]
        running = store.get(record.id)
        assert running is not None and len(running.history) == 1 and running.history_dropped == 0
        fresh = policy.completed(b"fresh").ending(second)
        assert store.finish(record.id, second.token, fresh)
        assert not store.finish(record.id, second.token, fresh)  # a replay
        final = store.get(record.id)
        assert final is not None and final.result == b"fresh"
        assert [(e["outcome"], e["worker"]) for e in final.history] == [("lost", "gone:41:r:aa"),
                                                                      (COMPLETE, "here:42:r:bb")]

    def test_outcomes_that_end_no_attempt_keep_the_history_as_it_is(self, store: Persistence,
                                                                   queue_name: str) -> None:
        record = make_record(queue_name)
        store.enqueue([record])
        [claimed] = store.claim("r", "w:1:r:a", 10)
        assert store.finish(record.id, claimed.token, policy.release(claimed))  # a hand-back: never started
        [again] = store.claim("r", "w:2:r:a", 10)
        assert store.request_kill(record.id)
        # A retry of a job whose kill was requested ends it killed; the attempt is still recorded, once.
        assert store.finish(record.id, again.token, _retry_now(again))
        killed = store.get(record.id)
        assert killed is not None and killed.state == KILLED
        assert [(e["attempt"], e["outcome"], e["worker"]) for e in killed.history] == [(1, "error", "w:2:r:a")]
        assert store.finish(record.id, killed.token, policy.requeue(killed), expect=KILLED)
        requeued = store.get(record.id)
        assert requeued is not None and requeued.state == PENDING and len(requeued.history) == 1

    # -- real pools ------------------------------------------------------------------

    def test_a_job_that_fails_twice_then_succeeds_has_three_entries(
            self, backend: BackendUnderTest, queue: SkunkQueue, start_pool: Any, tmp_path: Path) -> None:
        pool = start_pool(["r"])
        [worker] = queue.workers()
        flaky = declare(queue, jobs.flaky, retries=2, retry_backoff=0.01)
        attempts = tmp_path / "attempts"
        handle = flaky.fire(str(attempts), 2)
        assert handle.wait(timeout=30) == 3
        record = queue.get(handle.id)
        assert record is not None and record.history_dropped == 0
        history = record.history
        assert [(e["attempt"], e["outcome"], e["error_type"]) for e in history] == [
            (1, "error", "ValueError"), (2, "error", "ValueError"), (3, COMPLETE, None)]
        ran_in = [int(line.split()[1]) for line in attempts.read_text().splitlines()]
        assert [e["pid"] for e in history] == ran_in and set(ran_in) <= set(pool.worker_pids())
        for entry in history:
            assert (entry["worker"], entry["host"]) == (worker.id, socket.gethostname())
            assert entry["started"] <= entry["finished"]
        assert "failure 1 of 2" in history[0]["message"] and "raise ValueError" in history[0]["traceback"]
        assert history[0]["finished"] <= history[1]["started"] and history[1]["finished"] <= history[2]["started"]
        # skunq job shows it, and --json holds it.
        runner = CliRunner()
        base = ["-q", queue.name, *backend.cli_args()]
        shown = runner.invoke(cli_main, ["job", handle.id, "--json", *base])
        assert shown.exit_code == 0, shown.output
        data = json.loads(shown.output)
        assert [e["outcome"] for e in data["history"]] == ["error", "error", COMPLETE]
        assert data["history_dropped"] == 0 and data["history"][0]["worker"] == worker.id
        text = runner.invoke(cli_main, ["job", handle.id, *base])
        assert text.exit_code == 0, text.output
        rows = [line for line in text.output.splitlines() if line.lstrip().startswith(("1 ", "2 ", "3 "))]
        assert len(rows) == 3 and "ValueError" in rows[0] and COMPLETE in rows[2] and worker.id in rows[2]

    def test_attempts_of_killed_workers_show_as_lost(self, queue: SkunkQueue, start_pool: Any,
                                                     tmp_path: Path) -> None:
        marker = tmp_path / "starts"
        handle = declare(queue, jobs.nap).fire(3.0, str(marker))
        first = start_pool(["r"], lease=1.5)

        def starts() -> list[int]:
            return [int(line.split()[1]) for line in marker.read_text().splitlines()] if marker.exists() else []

        wait_until(lambda: len(starts()) == 1, what="the first attempt to start")
        # 1: only the worker is killed; its pool sees it die and records the attempt.
        os.kill(starts()[0], signal.SIGKILL)
        wait_until(lambda: len(starts()) == 2, timeout=30, what="the second attempt to start")
        # 2: the pool and its worker are killed; nobody renews the lease, a new pool takes the job back.
        workers = first.worker_pids()
        first.signal(signal.SIGKILL)
        first.wait(10)
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # it died with its pool
        wait_until(lambda: not any(pid_alive(p) for p in workers), timeout=5, what="the workers to die")
        start_pool(["r"], lease=1.5)
        assert handle.wait(timeout=60) == "rested"
        record = queue.get(handle.id)
        assert record is not None
        ran_in = starts()
        assert len(ran_in) == 3
        assert [(e["attempt"], e["outcome"], e["pid"]) for e in record.history] == [
            (1, "lost", ran_in[0]), (2, "lost", ran_in[1]), (3, COMPLETE, ran_in[2])]
        assert [e["error_type"] for e in record.history] == ["WorkerDied", "LeaseLost", None]
        assert all(e["worker"] and e["worker"].split(":")[1] == str(e["pid"]) for e in record.history)
