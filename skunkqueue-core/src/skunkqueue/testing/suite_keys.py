"""Idempotency keys: one record per key, whatever the concurrency (see ``Persistence.enqueue_keyed``)."""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from skunkqueue import interpreter, policy
from skunkqueue.errors import BackendUnavailable
from skunkqueue.persistence import Persistence
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import COMPLETE, PENDING
from skunkqueue.testing import jobs
from skunkqueue.testing.kit import BackendUnderTest
from skunkqueue.testing.suite_support import Producer, declare, make_record, wait_until


@dataclass
class RestartRun:
    """What :func:`keys_through_a_restart` saw: enqueue calls that returned, refused, and the slowest one."""

    calls: int
    refused: int
    slowest: float


def keys_through_a_restart(open_store: Callable[[], Persistence], restart: Callable[[], None],
                           calls_each_side: int = 50) -> RestartRun:
    """Three producers enqueue keyed batches while ``restart`` kills and restarts the server.

    Afterwards every key is held by exactly one stored record, and that is the
    record every caller was told held it. ``open_store`` opens the queue (it
    is called from several threads); the caller checks from the returned run
    that the restart was felt (calls refused, or slow).
    """
    keys = [f"order-{i}" for i in range(200)]
    told: dict[str, set[str]] = {}
    lock = threading.Lock()
    stop = threading.Event()
    run = RestartRun(0, 0, 0.0)

    def produce(seed: int) -> None:
        rng = random.Random(seed)
        with open_store() as store:
            while not stop.is_set():
                batch = [make_record(store.queue, key=rng.choice(keys)) for _ in range(5)]
                started = time.monotonic()
                try:
                    holders = store.enqueue_keyed(batch)
                except BackendUnavailable:
                    with lock:
                        run.refused += 1
                    time.sleep(0.05)
                    continue
                with lock:
                    run.slowest = max(run.slowest, time.monotonic() - started)
                    run.calls += 1
                    for record, holder in zip(batch, holders):
                        told.setdefault(record.key or "", set()).add(holder)

    producers = [threading.Thread(target=produce, args=(seed,)) for seed in range(3)]
    for producer in producers:
        producer.start()
    try:
        wait_until(lambda: run.calls >= calls_each_side, timeout=60, what="keyed enqueues before the restart")
        restart()
        after = run.calls
        wait_until(lambda: run.calls >= after + calls_each_side, timeout=60,
                   what="keyed enqueues after the restart")
    finally:
        stop.set()
        for producer in producers:
            producer.join(60)
    with open_store() as store:
        stored: dict[str, list[str]] = {}
        for record in store.list_jobs(limit=10**6):
            stored.setdefault(record.key or "", []).append(record.id)
    twice = {k: ids for k, ids in stored.items() if len(ids) > 1}
    assert not twice, f"keys held by more than one record: {twice}"
    changed = {k: ids for k, ids in told.items() if ids != set(stored.get(k, []))}
    assert not changed, f"callers were told of holders that are not the stored record: {changed}"
    return run


def _needs_keys(store: Persistence) -> None:
    if not store.supports_keys:
        pytest.skip(f"the {store.name} backend does not implement enqueue_keyed (idempotency keys)")


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

    def test_a_key_repeated_in_one_batch_makes_one_record(self, store: Persistence, queue_name: str) -> None:
        # The second record of a key must find the first one written in the same call.
        _needs_keys(store)
        first, again, other, third = (make_record(queue_name) for _ in range(4))
        first.key = again.key = third.key = "twice"
        other.key = "once"
        assert store.enqueue_keyed([first, other, again, third]) == [first.id, other.id, first.id, first.id]
        assert store.get(again.id) is None and store.get(third.id) is None
        assert sorted(r.id for r in store.list_jobs()) == sorted([first.id, other.id])
        late = make_record(queue_name)
        late.key = "twice"
        assert store.enqueue_keyed([late, late]) == [first.id, first.id]

    def test_fire_many_with_a_key_repeated_returns_one_job_twice(self, queue: SkunkQueue, store: Persistence,
                                                                 start_pool: Any, tmp_path: Path,
                                                                 producer: Producer) -> None:
        _needs_keys(store)
        mark = declare(queue, jobs.mark)
        log = tmp_path / "executions"
        handles = producer.fire_many(mark, [(str(log), "a"), (str(log), "b"), (str(log), "c")],
                                     keys=["dup", "other", "dup"])
        assert handles[0].id == handles[2].id != handles[1].id
        assert len(store.list_jobs()) == 2
        start_pool(["r"])
        for handle in handles:
            producer.wait(handle, timeout=20)
        assert sorted(log.read_text().split()) == ["a", "b"]

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
        procs = [subprocess.Popen(interpreter.command("skunkqueue.testing.firing", json.dumps(spec)),
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
