"""fire(..., using=session) on MongoDB beyond the kit: standalone servers, other deployments, keys, workflows."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from pymongo import MongoClient

from skunkqueue import SkunkQueue
from skunkqueue.errors import ConfigurationError
from skunkqueue.testing import jobs

DB = "skunkqueue_using"


def _queue(server: Any) -> SkunkQueue:
    return SkunkQueue(f"using-{uuid.uuid4().hex[:8]}", backend="mongodb", conn_url=server.url, dbname=DB)


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    return text


def test_a_transaction_on_a_standalone_server_is_refused_in_one_line(mongo_standalone: Any) -> None:
    queue = _queue(mongo_standalone)
    add = queue.event(routes=["r"])(jobs.add.func)
    try:
        with MongoClient(mongo_standalone.url) as client, client.start_session() as session:
            session.start_transaction()
            with pytest.raises(ConfigurationError) as caught:
                add.fire(1, 2, using=session)
            assert "standalone" in _one_line(caught.value) and "replica set" in str(caught.value)
            session.abort_transaction()
            # Without a transaction, a session of the queue's deployment simply stores the job.
            stored = add.fire(3, 4, using=session)
        assert queue.get(stored.id) is not None
    finally:
        queue.close()


def test_a_session_of_another_deployment_is_refused_and_stores_nothing(mongo_replset: Any,
                                                                     mongo_standalone: Any) -> None:
    queue = _queue(mongo_replset)
    add = queue.event(routes=["r"])(jobs.add.func)
    try:
        with MongoClient(mongo_standalone.url) as client, client.start_session() as session:
            with pytest.raises(ConfigurationError) as caught:
                add.fire(1, 2, using=session)
            assert "another MongoDB deployment" in _one_line(caught.value)
            assert client[DB]["jobs"].count_documents({"queue": queue.name}) == 0
        assert queue.persistence.counts() == {}
    finally:
        queue.close()


def test_a_key_held_outside_the_transaction_returns_its_holder_and_rollback_keeps_it(mongo_replset: Any) -> None:
    queue = _queue(mongo_replset)
    add = queue.event(routes=["r"])(jobs.add.func)
    try:
        first = add.fire(1, 2, key="order-7")
        with MongoClient(mongo_replset.url) as client, client.start_session() as session:
            session.start_transaction()
            again = add.fire(3, 4, key="order-7", using=session)
            fresh = add.fire(5, 6, key="order-8", using=session)
            assert again.id == first.id
            session.abort_transaction()
            assert queue.get(first.id) is not None and queue.get(fresh.id) is None
            session.start_transaction()
            client["app"]["rows"].insert_one({"order": 8}, session=session)
            kept = add.fire(5, 6, key="order-8", using=session)
            assert queue.get(kept.id) is None  # nobody sees it before the commit
            session.commit_transaction()
        assert queue.get(kept.id) is not None and sum(queue.persistence.counts().values()) == 2
    finally:
        queue.close()


def test_a_workflow_with_using_is_refused_in_one_line(mongo_replset: Any) -> None:
    queue = _queue(mongo_replset)
    add = queue.event(routes=["r"])(jobs.add.func)
    try:
        parent = add.fire(1, 2)
        with MongoClient(mongo_replset.url) as client, client.start_session() as session:
            session.start_transaction()
            with pytest.raises(ConfigurationError) as caught:
                add.fire(3, 4, after=[parent], using=session)
            assert "after=" in _one_line(caught.value)
            session.abort_transaction()
    finally:
        queue.close()
