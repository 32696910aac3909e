"""Workflows on PostgreSQL beyond the kit: the count-down against a dependent attached at the same
instant as its parent finishes, from two connections, each order forced; and an upgraded schema.

The kit's WorkflowSuite (test_postgres_conformance.py) covers the rules themselves.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any, Callable

import psycopg
import pytest
from skunkqueue_postgres import schema
from skunkqueue_postgres.persistence import PostgresPersistence

from skunkqueue import dependencies, policy
from skunkqueue.testing.suite_support import make_record

HOLD = 1.5  # seconds one side keeps its transaction open while the other comes


def _store(opened: Callable[..., Any], postgres: Any, queue: str, db: str) -> PostgresPersistence:
    store: PostgresPersistence = opened(queue, postgres.url, db=db)
    return store


def _rows(postgres: Any, db: str, table: str, child: str) -> int:
    with psycopg.connect(postgres.url) as conn:
        row = conn.execute(f"SELECT count(*) FROM {db}.{table} WHERE child = %s", (child,)).fetchone()
        assert row is not None
        return int(row[0])


@pytest.mark.parametrize("first", ["the finish", "the attach"])
def test_a_dependent_attached_while_its_parent_finishes_is_released_once(
        postgres: Any, opened: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, first: str) -> None:
    db, queue = f"t_{uuid.uuid4().hex[:10]}", f"pq-{uuid.uuid4().hex[:8]}"
    worker, producer = _store(opened, postgres, queue, db), _store(opened, postgres, queue, db)
    parent = make_record(queue)
    worker.enqueue([parent])
    [running] = worker.claim("r", "w", 30)
    child = make_record(queue, parents=[parent.id], due=dependencies.WAITING_DUE)
    took: dict[str, float] = {}
    errors: list[BaseException] = []

    def hold(store: PostgresPersistence, name: str) -> None:
        original = getattr(store, name)

        def held(*args: Any) -> Any:
            result = original(*args)
            time.sleep(HOLD)  # inside the transaction: its locks and its writes stay uncommitted
            return result

        monkeypatch.setattr(store, name, held)

    def timed(what: str, call: Callable[[], Any]) -> None:
        began = time.monotonic()
        try:
            call()
        except BaseException as exc:
            errors.append(exc)
        took[what] = time.monotonic() - began

    finish = threading.Thread(target=timed, args=("finish", lambda: worker.finish(
        parent.id, running.token, policy.completed(b"1"))))
    attach = threading.Thread(target=timed, args=("attach", lambda: producer.enqueue([child])))
    if first == "the finish":
        hold(worker, "_settle")  # after the finish's update and count, before its commit
        threads = [finish, attach]
    else:
        hold(producer, "_attach")  # after the edges and the parents' locks, before the commit
        threads = [attach, finish]
    threads[0].start()
    time.sleep(HOLD / 3)
    threads[1].start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    released = worker.claim("r", "w", 30, limit=5)
    assert [r.id for r in released] == [child.id], "every parent finished, yet the dependent still waits"
    assert worker.claim("r", "w", 30, limit=5) == []
    assert (_rows(postgres, db, "settled", child.id), _rows(postgres, db, "waits", child.id)) == (1, 0)
    later = "attach" if first == "the finish" else "finish"
    assert took[later] >= HOLD / 2, f"the {later} did not wait for the other transaction: {took}"


def test_a_schema_of_the_previous_version_gains_workflows(postgres: Any, opened: Callable[..., Any]) -> None:
    db, queue = f"t_{uuid.uuid4().hex[:10]}", f"pq-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        schema.ensure(conn, db, upto=schema.VERSION - 1)
        assert conn.execute("SELECT to_regclass(%s)", (f"{db}.waits",)).fetchone() == (None,)
    store = _store(opened, postgres, queue, db)
    with psycopg.connect(postgres.url) as conn:
        assert schema.version_of(conn, db) == schema.VERSION
    first = make_record(queue)
    second = make_record(queue, parents=[first.id], inputs=first.id, due=dependencies.WAITING_DUE,
                         workflow="wf-1")
    store.enqueue([first, second])
    [running] = store.claim("r", "w", 30, limit=5)
    assert running.id == first.id
    assert store.finish(first.id, running.token, policy.completed(b"7"))
    [released] = store.claim("r", "w", 30, limit=5)
    assert (released.id, released.parents, released.inputs, released.workflow) == (
        second.id, [first.id], first.id, "wf-1")
    assert store.dependents(first.id) == [second.id]


@pytest.mark.parametrize("fanout", [1_000])
def test_a_fan_out_ended_by_one_finish_is_counted_down_in_a_few_statements(
        postgres: Any, opened: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, fanout: int) -> None:
    """a fails; its dependents end killed, and so does the dependent of each of them. Each level is
    counted for in one statement, not one per record: a statement per dependent made a 2,500
    fan-out's finish outlive the 15 s call timeout on a loaded CI machine."""
    db, queue = f"t_{uuid.uuid4().hex[:10]}", f"pq-{uuid.uuid4().hex[:8]}"
    store = _store(opened, postgres, queue, db)
    a = make_record(queue)
    level1 = [make_record(queue, parents=[a.id], due=dependencies.WAITING_DUE) for _ in range(fanout)]
    level2 = [make_record(queue, parents=[r.id], due=dependencies.WAITING_DUE) for r in level1]
    store.enqueue([a, *level1, *level2])
    [running] = store.claim("r", "w", 30, limit=5)
    statements = 0
    execute = psycopg.Connection.execute

    def counted(conn: psycopg.Connection[Any], *args: Any, **kwargs: Any) -> Any:
        nonlocal statements
        statements += 1
        return execute(conn, *args, **kwargs)

    monkeypatch.setattr(psycopg.Connection, "execute", counted)
    assert store.finish(a.id, running.token, policy.failed(running, {"type": "ValueError", "message": "x",
                                                                      "traceback": ""}))
    monkeypatch.undo()
    assert statements <= 12, f"{statements} statements for a finish that ends {2 * fanout} dependents"
    records = store.get_many([r.id for r in level1 + level2])
    assert all(r is not None and r.state == "killed" for r in records)
    assert [r.error["message"] for r in records[-2:] if r is not None and r.error] == [
        f"{level1[-2].id} ended killed", f"{level1[-1].id} ended killed"]
    with psycopg.connect(postgres.url) as conn:
        assert conn.execute(f"SELECT count(*) FROM {db}.waits").fetchone() == (0,)
