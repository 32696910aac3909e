"""Signed records stay where they were fired: a copy moved in the store runs nowhere.

Signing binds a record's queue, route and broadcast target, but the store
decides which records a worker claims. A store writer can move a record a key
holder signed into another queue, another route's pending set or another
worker's broadcast set without touching its fields; whatever the backend
then hands the worker, the job must end ``error`` and nothing of it run.
Executions are counted in a file outside the queue.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from skunkqueue import signing
from skunkqueue.persistence import Persistence
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import COMPLETE, ERROR, JobRecord
from skunkqueue.testing import jobs
from skunkqueue.testing.kit import BackendUnderTest
from skunkqueue.testing.suite_support import make_record, wait_until

SECRET = "one key shared by every tenant"


def _ends_refused(store: Persistence, job_id: str) -> JobRecord:
    record = wait_until(lambda: (r := store.get(job_id)) is not None and r.state not in ("pending", "running")
                        and r, timeout=30, what=f"job {job_id} to end")
    assert record.state == ERROR and record.error is not None, record
    assert "nothing of it ran" in record.error["message"].lower(), record.error
    return record


class TrustSuite:
    """Mixed into :class:`~skunkqueue.testing.ConformanceSuite`."""

    def _misfile(self, backend: BackendUnderTest) -> Callable[[str, str, str, str, str | None], None]:
        if backend.misfile is None:
            pytest.skip("BackendUnderTest.misfile is not given: the kit cannot move a record between "
                        "queues, routes or targets of this store as a store writer could")
        return backend.misfile

    def test_a_signed_record_moved_to_another_queue_does_not_run(
            self, backend: BackendUnderTest, queue: SkunkQueue, store: Persistence, start_pool: Any,
            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        misfile = self._misfile(backend)
        monkeypatch.setenv(signing.SECRET_ENV, SECRET)
        log = tmp_path / "executions"
        other = SkunkQueue(backend.new_queue_name(), backend=backend.name, conn_url=backend.url,
                           dbname=backend.db, **backend.options)
        try:
            # Tenant A fires; nobody serves A, so its record waits, signed, in A's store.
            theirs = other.event(routes=["r"])(jobs.mark.func).fire(str(log), "tenant-a")
        finally:
            other.close()
        # The same function is declared on this queue too: only the address can tell them apart.
        ours = queue.event(routes=["r"])(jobs.mark.func).fire(str(log), "tenant-b")
        misfile(other.name, theirs.id, queue.name, "r", None)
        start_pool(["r"], env={signing.SECRET_ENV: SECRET})
        _ends_refused(store, theirs.id)
        assert ours.wait(30) and ours.state == COMPLETE
        assert log.read_text().split() == ["tenant-b"]

    def test_a_signed_record_moved_to_another_route_does_not_run(
            self, backend: BackendUnderTest, queue: SkunkQueue, store: Persistence, start_pool: Any,
            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        misfile = self._misfile(backend)
        monkeypatch.setenv(signing.SECRET_ENV, SECRET)
        log = tmp_path / "executions"
        fired = queue.event(routes=["r1", "r2"])(jobs.mark.func).fire(str(log), "once")
        ids = dict(zip(fired.routes, fired.ids))
        misfile(queue.name, ids["r1"], queue.name, "r2", None)
        start_pool(["r2"], env={signing.SECRET_ENV: SECRET})
        _ends_refused(store, ids["r1"])
        wait_until(lambda: (r := store.get(ids["r2"])) is not None and r.state == COMPLETE, timeout=30,
                   what="the record fired for r2 to complete")
        assert log.read_text().split() == ["once"]  # r2's own delivery ran, r1's did not

    def test_a_signed_broadcast_record_moved_to_another_worker_does_not_run(
            self, backend: BackendUnderTest, queue: SkunkQueue, store: Persistence, start_pool: Any,
            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        misfile = self._misfile(backend)
        monkeypatch.setenv(signing.SECRET_ENV, SECRET)
        log = tmp_path / "executions"
        start_pool(["r"], env={signing.SECRET_ENV: SECRET})
        [worker] = wait_until(lambda: [w for w in store.workers() if w.route == "r"], timeout=30,
                              what="the worker to register")
        # What a producer signs for another worker of a broadcast (one that is not running now).
        elsewhere = make_record(queue.name, "r", target="another-worker", func=jobs.mark.name,
                                payload=json.dumps([[str(log), "broadcast"], {}]).encode())
        signing.sign(SECRET.encode(), elsewhere)
        store.enqueue([elsewhere])
        misfile(queue.name, elsewhere.id, queue.name, "r", worker.id)
        _ends_refused(store, elsewhere.id)
        assert not log.exists()
