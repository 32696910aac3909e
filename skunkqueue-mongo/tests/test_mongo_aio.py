"""The asyncio side on PyMongo's AsyncMongoClient (skunkqueue_mongo/aio.py): same server, same options, no thread."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any, Callable, Iterator

import pytest

from skunkqueue.errors import BackendUnavailable
from skunkqueue.record import PENDING, JobRecord
from skunkqueue.testing.suite import make_record
from skunkqueue_mongo.persistence import MongoPersistence

DB = "skunkqueue_aio_tests"


@pytest.fixture
def queue_name() -> str:
    return f"mq-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def opened() -> Iterator[Callable[..., MongoPersistence]]:
    instances: list[MongoPersistence] = []

    def open_(queue: str, url: str, db: str | None = DB, **options: Any) -> MongoPersistence:
        instance = MongoPersistence(queue, url=url, db=db, **options)
        instances.append(instance)
        return instance

    yield open_
    for instance in instances:
        instance.close()


def round_trip(store: MongoPersistence, record: JobRecord | None = None) -> JobRecord:
    record = record or make_record(store.queue)

    async def go() -> JobRecord | None:
        await store.aenqueue([record])
        return await store.aget(record.id)

    got = asyncio.run(go())
    assert got is not None and got.id == record.id and got.state == PENDING
    # Served by AsyncMongoClient, not by the thread the default methods use.
    assert "_async_executor" not in store.__dict__
    return got


def test_credentials_and_database_are_those_of_the_uri(mongo_auth: Any, opened: Any, queue_name: str) -> None:
    store = opened(queue_name, mongo_auth.user_url(mongo_auth.user, mongo_auth.password))
    got = round_trip(store)
    # The sync client sees what the async one stored: same server, same database.
    assert store.get(got.id) is not None and store.jobs.database.name == DB


def test_keys_hold_across_sync_and_async_producers(mongo: Any, opened: Any, queue_name: str) -> None:
    store = opened(queue_name, mongo.url)
    first, again, other = (make_record(queue_name) for _ in range(3))
    first.key = again.key = "invoice-7"
    other.key = "invoice-8"
    assert store.enqueue_keyed([first]) == [first.id]
    assert asyncio.run(store.aenqueue_keyed([again, other])) == [first.id, other.id]
    assert store.get(again.id) is None and store.counts() == {("r", PENDING): 2}


def test_server_going_away_is_backend_unavailable(make_mongo: Callable[..., Any], opened: Any,
                                                  queue_name: str) -> None:
    server = make_mongo()
    store = opened(queue_name, f"mongodb://{server.host}/?serverSelectionTimeoutMS=1500")
    round_trip(store)
    server.stop()
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=server.host):
        asyncio.run(store.aenqueue([make_record(queue_name)]))
    assert time.monotonic() - started < 10


def test_each_event_loop_gets_its_own_client(mongo_standalone: Any, opened: Any, queue_name: str) -> None:
    store = opened(queue_name, mongo_standalone.url)
    errors: list[BaseException] = []

    async def fire(n: int) -> None:
        for _ in range(n):
            await store.aenqueue([make_record(queue_name)])

    def in_thread() -> None:
        try:
            asyncio.run(fire(100))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=in_thread) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    asyncio.run(fire(50))
    assert not errors, errors
    assert store.counts() == {("r", PENDING): 250}
