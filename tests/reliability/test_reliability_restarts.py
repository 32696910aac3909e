"""The server restarts mid-run: no job is lost, producers and workers recover by themselves.

The server is killed (SIGKILL: only what it made durable survives; Redis runs
with ``appendonly yes, appendfsync always``, mongod journals) twice while a
producer fires and a real worker pool runs jobs, and brought back at the same
address after a pause. The producer application's only recovery is to retry a
``fire`` that raised; the worker pool is never touched.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import reliability_jobs
from conftest import Figures, open_queue, pool_starter
from reliability_backends import Target
from reliability_support import executions, wait_until

from skunkqueue import serializer
from skunkqueue.errors import SkunkQueueError
from skunkqueue.record import COMPLETE
from skunkqueue.testing.workers import pid_alive

JOBS = 200
RESTARTS = 2
DOWNTIME = 2.0
ROUTES = ["a", "b"]


def test_server_restarts_lose_no_job(target: Target, tmp_path: Path, figures: Figures) -> None:
    if target.restartable is None:
        pytest.skip(target.notes.get("restart", "no server to restart"))
    with target.restartable(tmp_path) as (backend, server):
        queue_name = backend.new_queue_name().replace("kit-", "rel-restart-")
        start, pools = pool_starter(backend, queue_name, tmp_path)
        log = tmp_path / "executions"
        fired: dict[str, list[str]] = {}   # token -> ids of every fire that reported success
        fire_errors: list[str] = []
        done = threading.Event()
        try:
            pool = start(ROUTES, concurrency=1)
            workers = sorted(pool.worker_pids())

            def produce() -> None:
                q = open_queue(backend, queue_name)
                jobs = [q.event(routes=[r])(reliability_jobs.mark.func) for r in ROUTES]
                for i in range(JOBS):
                    token = f"t{i}"
                    while True:  # the application's recovery: fire again until it is accepted
                        try:
                            handle = jobs[i % 2].fire(str(log), token, 0.02)
                            fired.setdefault(token, []).append(handle.id)
                            break
                        except SkunkQueueError as exc:
                            fire_errors.append(type(exc).__name__)
                            time.sleep(0.2)
                    time.sleep(0.03)
                q.close()
                done.set()

            producer = threading.Thread(target=produce)
            producer.start()
            for _ in range(RESTARTS):
                time.sleep(2.0)
                server.down()
                time.sleep(DOWNTIME)
                server.up()
            producer.join(180)
            assert done.is_set(), "the producer never finished"

            checker = open_queue(backend, queue_name)

            def all_complete() -> bool:
                try:
                    states = {job_id: checker.persistence.get(job_id) for ids in fired.values() for job_id in ids}
                except SkunkQueueError:
                    return False
                return all(r is not None and r.state == COMPLETE for r in states.values())

            wait_until(all_complete, timeout=180, what="every fired job to complete after the restarts", every=0.5)
            runs = executions(log)
            assert sorted(fired) == sorted(f"t{i}" for i in range(JOBS))
            never_ran = [t for t in fired if not runs.get(t)]
            assert not never_ran, f"jobs lost across the restarts: {never_ran[:5]}"
            for token, ids in fired.items():
                for job_id in ids:
                    record = checker.persistence.get(job_id)
                    assert record is not None
                    assert serializer.loads(record.result or b"null", "json") in runs[token]
            # The pool recovered by itself: same pool process, its workers alive.
            assert pool.process.poll() is None
            restarted = sorted(pool.worker_pids()) != workers
            assert all(pid_alive(p) for p in pool.worker_pids())
            duplicates = sum(len(v) - 1 for v in runs.values() if len(v) > 1)
            checker.close()
        finally:
            for p in pools:
                p.stop()
    figures.record("server-restarts", fired=JOBS, lost=len(never_ran), duplicates=duplicates,
                   server_restarts=RESTARTS, fire_errors_retried=len(fire_errors),
                   workers_restarted_by_pool=restarted)
