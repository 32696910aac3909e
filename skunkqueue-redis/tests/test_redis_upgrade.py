"""A rolling upgrade: stores running the previous version's scripts (d9f66b6) and the current ones on
one queue. Records written and claimed by either are finished, read and waited for by the other."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import redis

from skunkqueue import policy
from skunkqueue.record import COMPLETE, PENDING, RUNNING
from skunkqueue.testing.suite_support import make_record
from skunkqueue_redis import scripts
from skunkqueue_redis.persistence import RedisPersistence

OLD = Path(__file__).parent / "scripts_d9f66b6"


def old_store(url: str, queue: str) -> RedisPersistence:
    """A store whose scripts are the old version's (the client code is today's: it reads both replies)."""
    original = scripts.read
    scripts.read = lambda name: (OLD / f"{name}.lua").read_text(encoding="utf-8")  # type: ignore[assignment]
    try:
        return RedisPersistence(queue, url=url, db="5")  # the raw fixture's db
    finally:
        scripts.read = original  # type: ignore[assignment]


@pytest.fixture
def pair(url: str, queue_name: str) -> Iterator[tuple[RedisPersistence, RedisPersistence]]:
    old, new = old_store(url, queue_name), RedisPersistence(queue_name, url=url, db="5")
    yield old, new
    old.close()
    new.close()


def test_the_old_scripts_really_differ() -> None:
    assert "pack(redis.call('HGETALL', key))" in (OLD / "claim.lua").read_text()
    assert "pack(redis.call('HGETALL', key))" not in scripts.read("claim")


@pytest.mark.parametrize("first", ["old", "new"])
def test_records_cross_between_old_and_new_scripts(pair: tuple[RedisPersistence, RedisPersistence],
                                                   raw: redis.Redis, first: str) -> None:
    old, new = pair
    a, b = (old, new) if first == "old" else (new, old)
    records = [make_record(a.queue, payload=b"p%d" % i) for i in range(4)]
    a.enqueue(records)
    # Claimed by one version, finished by the other; then the other way round.
    (one,) = a.claim("r", "w1", 30, limit=1)
    assert one.id == records[0].id and one.state == RUNNING and one.token == 1
    assert b.finish(one.id, one.token, policy.completed(b"r0"))
    (two,) = b.claim("r", "w2", 30, limit=1)
    assert two.id == records[1].id and two.payload == b"p1" and two.attempts == 1
    applied, (three,) = a.finish_and_claim(two.id, two.token, policy.completed(b"r1"), "r", "w1", 30, limit=1)
    assert applied and three.id == records[2].id and three.payload == b"p2"
    applied, (four,) = b.finish_and_claim(three.id, three.token, policy.completed(b"r2"), "r", "w2", 30, limit=1)
    assert applied and four.id == records[3].id
    # A stale token is fenced off whichever version finishes.
    assert not a.finish(three.id, three.token, policy.completed(b"again"))
    # Handed back (pending again, its done token dropped) by one version, claimed and finished by the other.
    assert b.finish(four.id, four.token, policy.release(four))
    assert raw.llen(b.keys.done(four.id)) == 0
    (again,) = a.claim("r", "w1", 30, limit=1)
    assert again.id == four.id and again.token == four.token + 1
    assert b.finish(again.id, again.token, policy.completed(b"r3"))
    for store in (old, new):
        for i, rec in enumerate(records):
            got = store.wait_finished(rec.id, timeout=2.0)
            assert got is not None and got.state == COMPLETE and got.result == b"r%d" % i
            # Each finished record has one done token, for the waiters of either version.
            assert raw.llen(store.keys.done(rec.id)) == 1
        (row,) = [r for r in store.summary().routes if r.route == "r"]
        assert (row.states[COMPLETE], row.states[RUNNING], row.states[PENDING]) == (4, 0, 0)
