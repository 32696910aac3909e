"""Idempotency keys: one record per key, whatever the concurrency (see ``Persistence.enqueue_keyed``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from skunkqueue import policy
from skunkqueue.persistence import Persistence
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import COMPLETE, PENDING
from skunkqueue.testing import jobs
from skunkqueue.testing.kit import BackendUnderTest
from skunkqueue.testing.suite_support import Producer, declare, make_record


def _needs_keys(store: Persistence) -> None:
    if not store.supports_keys:
        pytest.skip(f"the {store.name} backend does not implement enqueue_keyed (supports_keys = False)")


class KeysSuite:
    """Mixed into :class:`~skunkqueue.testing.ConformanceSuite`."""

    def test_enqueue_keyed_stores_one_record_per_key(self, store: Persistence, queue_name: str) -> None:
        _needs_keys(store)
        first, again, other, plain = (make_record(queue_name) for _ in range(4))
        first.key = again.key = "k:{1}$ é"
        other.key = "k:{2}"
        assert store.enqueue_keyed([first, other, plain]) == [first.id, other.id, plain.id]
        assert store.enqueue_keyed([again]) == [first.id]
        assert store.get(again.id) is None
        stored = store.get(first.id)
        assert stored is not None and stored.key == first.key
        assert len(store.list_jobs(state=PENDING)) == 3
        # Running and finished records still hold their key.
        [claimed] = store.claim("r", "w", 10)
        assert store.enqueue_keyed([make_record(queue_name)]) and claimed.id == first.id
        assert store.finish(claimed.id, claimed.token, policy.completed(b"3"))
        late = make_record(queue_name)
        late.key = first.key
        assert store.enqueue_keyed([late]) == [first.id]

    def test_a_key_is_free_again_once_its_record_expired(self, backend: BackendUnderTest,
                                                         queue_name: str) -> None:
        with backend.open(queue_name, result_ttl=0.5) as store:
            _needs_keys(store)
            record = make_record(queue_name)
            record.key = "once"
            store.enqueue_keyed([record])
            [claimed] = store.claim("r", "w", 10)
            store.finish(claimed.id, claimed.token, policy.completed(b"1"))
            time.sleep(1.5)
            store.delete_expired(time.time())
            fresh = make_record(queue_name)
            fresh.key = "once"
            assert store.enqueue_keyed([fresh]) == [fresh.id]

    @pytest.mark.parametrize("api", ["sync", "async"])
    def test_processes_firing_one_key_at_once_make_one_record(self, backend: BackendUnderTest, api: str,
                                                              queue: SkunkQueue, store: Persistence) -> None:
        _needs_keys(store)
        spec = {"backend": backend.name, "url": backend.url, "db": backend.db, "options": backend.options,
                "queue": queue.name, "key": "invoice-42", "times": 5, "start_at": time.time() + 2.0, "api": api}
        procs = [subprocess.Popen([sys.executable, "-m", "skunkqueue.testing.firing", json.dumps(spec)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=backend.process_env()) for _ in range(4)]
        outputs = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
        ids = {line for out, _ in outputs for line in out.split()}
        assert len(ids) == 1, f"{len(ids)} different jobs for one key"
        records = store.list_jobs()
        assert [r.id for r in records] == list(ids)

    def test_a_keyed_job_runs_once(self, queue: SkunkQueue, store: Persistence, start_pool: Any,
                                   tmp_path: Path, producer: Producer) -> None:
        _needs_keys(store)
        mark = declare(queue, jobs.mark)
        log = tmp_path / "executions"
        first = producer.fire(mark, str(log), "a", key="once")
        assert producer.fire(mark, str(log), "b", key="once").id == first.id
        start_pool(["r"])
        producer.wait(first, timeout=20)
        assert producer.fire(mark, str(log), "c", key="once").id == first.id  # finished, not expired: still held
        batch = producer.fire_many(mark, [(str(log), "d"), (str(log), "e")], keys=["once", "other"])
        assert batch[0].id == first.id and batch[1].id != first.id
        producer.wait(batch[1], timeout=20)
        assert log.read_text().split() == ["a", "e"]
        assert first.state == COMPLETE
