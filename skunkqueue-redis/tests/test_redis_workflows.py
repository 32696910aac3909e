"""Workflows on Redis: what release.lua leaves in the store, and a server restart mid-workflow."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import redis

from skunkqueue import dependencies, policy
from skunkqueue.backends import open_backend
from skunkqueue.persistence import Persistence
from skunkqueue.testing.suite_support import make_record
from skunkqueue_redis.keys import Keys


@pytest.fixture
def store(url: str, queue_name: str) -> Iterator[Persistence]:
    backend = open_backend(queue_name, "redis", url=url, db="5")
    yield backend
    backend.close()


def _complete(store: Persistence, job_id: str) -> None:
    """Claim (the oldest due record: the test's next one) and complete ``job_id``."""
    [claimed] = store.claim("r", "w", 30)
    assert claimed.id == job_id
    assert store.finish(job_id, claimed.token, policy.completed(b"1"))


def test_a_plain_finish_touches_no_workflow_key_and_a_released_one_leaves_none_behind(
        store: Persistence, raw: redis.Redis, queue_name: str) -> None:
    keys = Keys(queue_name)
    settled = keys.base + "settled:"
    plain = make_record(queue_name)
    store.enqueue([plain])
    _complete(store, plain.id)
    assert not raw.exists(keys.deps(plain.id), settled + plain.id)
    assert raw.hget(keys.job(plain.id), "has_deps") is None
    a, b = make_record(queue_name), make_record(queue_name)
    c = make_record(queue_name, parents=[a.id, b.id], due=dependencies.WAITING_DUE)
    store.enqueue([a, b, c])
    assert raw.hget(keys.job(a.id), "has_deps") == b"1"
    _complete(store, a.id)
    assert raw.hgetall(settled + c.id) == {a.id.encode(): b"complete"}
    assert raw.hget(keys.job(c.id), "wait_left") == b"1"
    _complete(store, b.id)
    # Released: its set and count are gone; each parent's dependents set expires with the parent.
    assert not raw.exists(settled + c.id) and raw.hget(keys.job(c.id), "wait_left") is None
    for parent in (a, b):
        assert 0 < raw.pttl(keys.deps(parent.id)) <= raw.pttl(keys.job(parent.id)) + 1000
    _complete(store, c.id)
    assert not raw.exists(settled + c.id, keys.deps(c.id))


def test_a_workflow_survives_a_server_restart(start_redis: Any, queue_name: str) -> None:
    server = start_redis(extra=["--appendonly", "yes", "--appendfsync", "always"])
    url = f"127.0.0.1:{server.port}"
    with open_backend(queue_name, "redis", url=url) as store:
        a, b = make_record(queue_name), make_record(queue_name)
        c = make_record(queue_name, parents=[a.id, b.id], due=dependencies.WAITING_DUE)
        store.enqueue([a, b, c])
        _complete(store, a.id)
    server.stop()  # SIGTERM: the append-only file has every acknowledged write (appendfsync always)
    server.start()
    with open_backend(queue_name, "redis", url=url) as store:
        assert [r.id for r in store.claim("r", "w", 30, limit=10)] == [b.id], "c was released early"
        got = store.get(b.id)
        assert got is not None and store.finish(b.id, got.token, policy.completed(b"2"))
        assert [r.id for r in store.claim("r", "w", 30, limit=10)] == [c.id]
        assert store.claim("r", "w", 30, limit=10) == []


def test_an_async_waiter_hears_a_step_killed_by_its_parent_at_once(store: Persistence, queue_name: str) -> None:
    """release.lua ends the step, not finish: its done signal must reach the loop's listener too
    (else the waiter only learns at its next 5 s look)."""
    import asyncio
    import time

    parent = make_record(queue_name)
    step = make_record(queue_name, parents=[parent.id], due=dependencies.WAITING_DUE)
    store.enqueue([parent, step])

    async def go() -> tuple[Any, float]:
        waiting = asyncio.create_task(store.await_finished(step.id, 30))
        await asyncio.sleep(0.3)
        [claimed] = store.claim("r", "w", 30)
        assert store.finish(parent.id, claimed.token, policy.killed("stop"))
        killed_at = time.monotonic()
        record = await waiting
        return record, time.monotonic() - killed_at

    record, late = asyncio.run(go())
    assert record is not None and record.state == "killed", record
    assert late < 1.0, f"heard {late:.1f} s after the parent was killed"


def _commands_per_member_finish(store: Persistence, raw: redis.Redis, queue_name: str, members: int) -> float:
    """Redis commands (scripts' included) per finish of a member of a ``members``-member chord."""
    group = [make_record(queue_name) for _ in range(members)]
    callback = make_record(queue_name, parents=[r.id for r in group], inputs=[r.id for r in group],
                           due=dependencies.WAITING_DUE)
    store.enqueue([*group, callback])
    claimed = store.claim("r", "w", 30, limit=members)
    assert len(claimed) == members
    raw.config_resetstat()
    for record in claimed:
        assert store.finish(record.id, record.token, policy.completed(b"1"))
    calls = sum(stat["calls"] for name, stat in raw.info("commandstats").items()
                if not name.startswith(("cmdstat_config", "cmdstat_info")))
    [released] = store.claim("r", "w", 30)
    assert released.id == callback.id
    return calls / members


def test_a_members_finish_costs_the_same_whatever_the_groups_size(
        store: Persistence, raw: redis.Redis, queue_name: str) -> None:
    # The contract: releasing a dependent is O(1) store work per finished parent. A
    # count-down that read the callback's parents or its set of finished ones would grow here.
    small = _commands_per_member_finish(store, raw, queue_name, 20)
    large = _commands_per_member_finish(store, raw, queue_name, 400)
    assert large <= small + 0.5, f"{large:.2f} commands per finish at 400 members, {small:.2f} at 20"
