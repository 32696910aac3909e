"""fire(..., using=conn) on the embedded SQLite backend beyond the kit's TransactionalSuite."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path

import pytest

from skunkqueue import SkunkQueue
from skunkqueue.errors import ConfigurationError
from skunkqueue.testing import jobs


def _queue(path: Path) -> SkunkQueue:
    return SkunkQueue(f"using-{uuid.uuid4().hex[:8]}", backend="sqlite", conn_url=str(path))


def test_fire_as_the_first_statement_of_a_transaction_is_rolled_back_with_it(tmp_path: Path) -> None:
    queue = _queue(tmp_path / "q.db")
    add = queue.event(routes=["r"])(jobs.add.func)
    try:
        conn = sqlite3.connect(tmp_path / "q.db")
        first = add.fire(1, 2, using=conn)   # nothing else ran in this transaction yet
        assert conn.in_transaction
        conn.rollback()
        kept = add.fire(3, 4, using=conn)
        conn.commit()
        conn.close()
        assert queue.get(first.id) is None and queue.get(kept.id) is not None
    finally:
        queue.close()


def test_an_autocommit_connection_stores_at_once(tmp_path: Path) -> None:
    queue = _queue(tmp_path / "q.db")
    add = queue.event(routes=["r"])(jobs.add.func)
    try:
        conn = sqlite3.connect(tmp_path / "q.db", isolation_level=None)
        stored = add.fire(1, 2, using=conn)
        assert not conn.in_transaction and queue.get(stored.id) is not None
        conn.close()
    finally:
        queue.close()


@pytest.mark.parametrize("other", ["other.db", ":memory:"])
def test_a_connection_to_another_file_is_refused_in_one_line_and_the_transaction_goes_on(
        tmp_path: Path, other: str) -> None:
    queue = _queue(tmp_path / "q.db")
    add = queue.event(routes=["r"])(jobs.add.func)
    try:
        conn = sqlite3.connect(other if other == ":memory:" else tmp_path / other)
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(ConfigurationError) as caught:
            add.fire(1, 2, using=conn)
        text = str(caught.value)
        assert "\n" not in text and "the queue's file" in text, text
        conn.commit()
        assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]
        conn.close()
        assert queue.persistence.counts() == {}
    finally:
        queue.close()


def test_the_idle_workers_are_poked_when_the_transaction_ends_not_before(tmp_path: Path) -> None:
    """No commit hook in sqlite3: a watcher thread pokes the idle workers when the transaction ends.

    Listened to as an idle worker listens (its FIFO in the wake folder), so the test does not hang
    on timing: a poll would find the job within max_idle_poll anyway, only later.
    """
    from skunkqueue.persistence.sqlite import SQLitePersistence
    from skunkqueue.persistence.wakefolder import tag

    path = tmp_path / "q.db"
    queue = _queue(path)
    mark = queue.event(routes=["r"])(jobs.mark.func)
    store = queue.persistence
    assert isinstance(store, SQLitePersistence)
    try:
        for ending in ("commit", "rollback", "close"):
            with store._wake.listen(f"{store._route_tag('r')}.{tag('an idle worker')}") as ear:
                assert ear is not None, "this platform gives no FIFOs: the backend polls"
                conn = sqlite3.connect(path)
                conn.execute("CREATE TABLE IF NOT EXISTS app (x)")
                conn.execute("INSERT INTO app VALUES (1)")
                mark.fire(str(tmp_path / "runs"), ending, using=conn)
                assert not ear.wait(0.3), "poked before the transaction ended"
                getattr(conn, ending)()
                assert ear.wait(10), f"no poke after the transaction's {ending}"
                if ending != "close":
                    conn.close()
        assert [r.state for r in store.list_jobs()] == ["pending"]  # only the committed one is there
    finally:
        queue.close()


def test_afire_refuses_using_in_one_line_and_stores_nothing(tmp_path: Path) -> None:
    import asyncio

    queue = _queue(tmp_path / "q.db")
    takes_anything = queue.event(routes=["r"])(takes_keywords)
    conn = sqlite3.connect(tmp_path / "q.db")
    try:
        async def fire_all() -> list[str]:
            refusals = []
            for fire in (lambda: takes_anything.afire(1, using=conn),
                         lambda: takes_anything.afire_at(60, 1, using=conn),
                         lambda: takes_anything.afire_many([(1,)], using=conn)):
                with pytest.raises(ConfigurationError) as refused:
                    await fire()
                refusals.append(str(refused.value))
            return refusals

        for message in asyncio.run(fire_all()):
            # Not the serializer failing on a connection passed on as the job's own argument.
            assert "\n" not in message and "afire(using=...) is not supported" in message and "fire(" in message
        assert queue.persistence.list_jobs(limit=10) == []
    finally:
        conn.close()
        queue.close()


def takes_keywords(x: int, **extra: object) -> int:
    """A job whose **extra would swallow using= as its own argument, were using= not reserved."""
    return x
