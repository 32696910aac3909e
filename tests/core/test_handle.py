"""``queue.handle(job_id)``: from an id (a web request's 202 answer) back to the handle ``fire`` returned."""

from __future__ import annotations

import asyncio
import os
import pickle
import sqlite3
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis_servers

from skunkqueue import JobFailed, JobNotFound, JobTimeout, SerializationError, SkunkQueue
from skunkqueue.record import COMPLETE, ERROR, PENDING
from skunkqueue.testing import jobs
from skunkqueue.testing.kit import BackendUnderTest
from skunkqueue.testing.workers import PoolProcess


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis_servers.RedisServer]:
    server = redis_servers.RedisServer(tmp_path_factory.mktemp("redis-handle")).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> BackendUnderTest:
    if request.param == "sqlite":
        return BackendUnderTest(name="sqlite", url=str(tmp_path / "q.db"))
    server = request.getfixturevalue("redis_server")
    return BackendUnderTest(name="redis", url=server.url, db="2")


def _queue(backend: BackendUnderTest, name: str) -> SkunkQueue:
    return SkunkQueue(name, backend=backend.name, conn_url=backend.url, dbname=backend.db)


def test_a_handle_from_an_id_does_what_fires_handle_does(backend: BackendUnderTest, tmp_path: Path) -> None:
    name = backend.new_queue_name()
    producer = _queue(backend, name)
    add = producer.event(routes=["r1", "r2"])(jobs.add.func)
    fail = producer.event(routes=["r1"])(jobs.fail.func)
    fired, failing = add.fire(2, 3), fail.fire("boom")
    # Another process's view: a fresh queue object that knows nothing but the ids.
    poller = _queue(backend, name)
    one = poller.handle(fired.ids[0])
    both = poller.handle(*fired.ids)
    assert one.state == PENDING and one.result is None and both.state == PENDING
    with pytest.raises(JobTimeout):
        one.wait(timeout=0.2)
    pool = PoolProcess(backend, name, ["r1", "r2"], log_path=tmp_path / "pool.log")
    try:
        pool.wait_ready()
        assert one.wait(timeout=30) == 5 and one.state == COMPLETE and one.result == 5
        assert both.wait(timeout=30) == {"r1": 5, "r2": 5} and both.result == fired.result
        assert both.ids == fired.ids and both.routes == fired.routes
        failed = poller.handle(failing.id)
        with pytest.raises(JobFailed) as caught:
            failed.wait(timeout=30)
        assert caught.value.error_type == "ValueError" and "boom" in (caught.value.remote_traceback or "")
        assert failed.state == ERROR and failed.error is not None and failed.error["message"] == "boom"

        async def in_a_loop() -> tuple[Any, Any, str]:
            handle = await _queue(backend, name).ahandle(fired.ids[1])
            return await handle.aresult(timeout=10), await handle, handle.state
        assert asyncio.run(in_a_loop()) == (5, 5, COMPLETE)
    finally:
        pool.stop()
    assert "Traceback" not in pool.log().replace("ValueError: boom", "")


def test_an_unknown_id_is_job_not_found(backend: BackendUnderTest) -> None:
    queue = _queue(backend, backend.new_queue_name())
    with pytest.raises(JobNotFound, match="No job 'nope' on queue") as caught:
        queue.handle("nope")
    assert isinstance(caught.value, LookupError)
    other = _queue(backend, backend.new_queue_name())
    fired = other.event(routes=["r"])(jobs.add.func).fire(1, 1)
    with pytest.raises(JobNotFound):  # another queue's job is not this queue's
        queue.handle(fired.id)
    with pytest.raises(JobNotFound):
        asyncio.run(queue.ahandle("nope"))


def test_a_stored_record_cannot_make_the_poller_unpickle(tmp_path: Path) -> None:
    """The record says it is pickled and its result is a pickle that would run code: handle() decodes
    with the queue's serializer (json), so it refuses the bytes instead of running them."""
    db = tmp_path / "q.db"
    queue = SkunkQueue("h", conn_url=str(db))
    fired = queue.event(routes=["r"])(jobs.add.func).fire(1, 2)
    planted = tmp_path / "planted"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.mkdir, (str(planted),))

    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE jobs SET state = 'complete', result = ?, "
                     "record = json_set(record, '$.serializer', 'pickle') WHERE id = ?",
                     (pickle.dumps(Exploit()), fired.id))
    handle = SkunkQueue("h", conn_url=str(db)).handle(fired.id)
    with pytest.raises(SerializationError):
        handle.result  # noqa: B018 - reading it is the test
    assert not planted.exists()


def test_get_is_the_raw_record(tmp_path: Path) -> None:
    queue = SkunkQueue("h", conn_url=str(tmp_path / "q.db"))
    fired = queue.event(routes=["r"])(jobs.add.func).fire(1, 2)
    record = queue.get(fired.id)
    assert record is not None and isinstance(record.payload, bytes) and record.state == PENDING
    assert queue.get("nope") is None
