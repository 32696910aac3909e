"""The pool's heartbeats for a worker on its way out: no warning, no ghost in the registry.

A worker unregisters itself as it exits. A heartbeat the pool sent between that and the exit
found the id gone, warned "presumed dead and reaped" and registered the exiting worker again,
leaving an entry for a dead process until housekeeping reaped it (seen with
``--max-jobs-per-child 1``, where a worker exits after every job).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest

from skunkqueue import channel, metrics
from skunkqueue.persistence.sqlite import SQLitePersistence
from skunkqueue.pool.children import Child
from skunkqueue.pool.supervisor import Supervisor
from skunkqueue.pool.upkeep import Upkeep
from skunkqueue.record import WorkerInfo
from skunkqueue.worker import EXIT_DRAINED, Worker, WorkerConfig

WARNING = "presumed dead and reaped"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLitePersistence]:
    opened = SQLitePersistence("upkeep", url=str(tmp_path / "q.db"))
    yield opened
    opened.close()


@pytest.fixture
def child(tmp_path: Path) -> Iterator[Child]:
    """A registered worker's Child whose process is alive (a sleeping interpreter)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    made = Child(WorkerConfig(queue="upkeep", route="r", url=str(tmp_path / "q.db")), process=process,
                 worker_id="w-leaving")
    yield made
    process.kill()
    process.wait()


def _register(store: SQLitePersistence, child: Child) -> None:
    assert child.worker_id is not None and child.process is not None
    store.register_worker(WorkerInfo(id=child.worker_id, queue="upkeep", route="r", host="h", pid=child.process.pid))


def _heartbeat_rounds(store: SQLitePersistence, child: Child, rounds: int) -> None:
    upkeep = Upkeep(WorkerConfig(queue="upkeep", route="r"), metrics.Tally(), renew_every=1.0)
    for _ in range(rounds):
        upkeep._heartbeat(store, child, stopping=False)


def test_a_worker_that_said_goodbye_gets_no_heartbeat_and_no_second_registration(
        store: SQLitePersistence, child: Child, caplog: pytest.LogCaptureFixture) -> None:
    _register(store, child)
    child.leaving = True  # the supervisor read its Goodbye
    store.unregister_worker("w-leaving")
    with caplog.at_level(logging.WARNING, logger="skunkqueue"):
        _heartbeat_rounds(store, child, 3)
    assert store.workers() == []
    assert WARNING not in caplog.text


def test_a_goodbye_not_read_yet_costs_one_round_not_a_ghost(
        store: SQLitePersistence, child: Child, caplog: pytest.LogCaptureFixture) -> None:
    _register(store, child)
    store.unregister_worker("w-leaving")
    with caplog.at_level(logging.WARNING, logger="skunkqueue"):
        _heartbeat_rounds(store, child, 1)  # the round that raced the worker's unregistering
        assert store.workers() == [] and WARNING not in caplog.text
        child.leaving = True  # read by the next round
        _heartbeat_rounds(store, child, 2)
    assert store.workers() == [] and WARNING not in caplog.text


def test_a_live_worker_reaped_by_mistake_is_registered_again_a_round_later(
        store: SQLitePersistence, child: Child, caplog: pytest.LogCaptureFixture) -> None:
    _register(store, child)
    store.unregister_worker("w-leaving")  # another pool's housekeeping presumed it dead
    with caplog.at_level(logging.WARNING, logger="skunkqueue"):
        _heartbeat_rounds(store, child, 2)
    assert [w.id for w in store.workers()] == ["w-leaving"]
    assert caplog.text.count(WARNING) == 1
    _heartbeat_rounds(store, child, 2)  # found again: no warning, no second entry
    assert [w.id for w in store.workers()] == ["w-leaving"] and caplog.text.count(WARNING) == 1


def test_a_worker_says_goodbye_before_it_unregisters_and_the_supervisor_hears_it(tmp_path: Path) -> None:
    """The order the pool relies on: the goodbye is in the pipe before the registry forgets the id."""
    url = str(tmp_path / "q.db")
    pipes = channel.PoolEnd()
    config = WorkerConfig(queue="upkeep", route="r", url=url, burst=True)
    worker = Worker(replace(config, events_fd=pipes.child_fds()[0]))
    registered_at_goodbye: list[list[str]] = []
    sent = worker.pool.send

    def send(*events: channel.Event) -> None:
        if any(isinstance(e, channel.Goodbye) for e in events):
            assert worker.backend is not None
            registered_at_goodbye.append([w.id for w in worker.backend.workers()])
        sent(*events)

    worker.pool.send = send  # type: ignore[method-assign]
    child = Child(config, pipes=pipes)
    try:
        assert worker.run() == EXIT_DRAINED
        assert registered_at_goodbye == [[worker.id]], "the goodbye came after the worker had unregistered"
        Supervisor([child], config, grace=1.0, tally=metrics.Tally())._read_events(None, child)
    finally:
        pipes.close()
    assert child.worker_id == worker.id and child.leaving
    store = SQLitePersistence("upkeep", url=url)
    try:
        assert store.workers() == []
    finally:
        store.close()
