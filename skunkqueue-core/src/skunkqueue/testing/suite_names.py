"""Names that could break a backend: part of the conformance suite (mixed into ConformanceSuite).

Queue, route and target names are arbitrary user strings while store keys,
field names and Redis Cluster hash tags are not. Every name below must either
round-trip exactly with nothing leaking between names, or (only where a store
has a hard limit: NUL, very long names) be refused with ConfigurationError
before anything is written, by ``Persistence.check_names``.
"""

from __future__ import annotations

import uuid

import pytest

from skunkqueue import policy
from skunkqueue.errors import ConfigurationError
from skunkqueue.persistence import Persistence
from skunkqueue.record import COMPLETE, PENDING
from skunkqueue.testing.kit import BackendUnderTest
from skunkqueue.testing.suite_support import make_record

HOSTILE = {
    "colon": "a:b",
    "star": "*",
    "open-brace": "{x",
    "close-brace": "}x",
    "empty-tag": "{}",
    "dollar": "$x",
    "dot": "a.b",
    "space": "a b",
    "slash": "a/b",
    "percent": "%3A",
    "nul": "a\x00b",
    "long": "x" * 10_240,
    "non-ascii": "ünï-日本-🦨",
}
# A store with hard limits may refuse these up front; every other name must work.
MAY_REFUSE = {"nul", "long"}

# (queue, route, target) triples that would share keys under a naive "queue:route:target" layout.
COLLIDING = {
    "colon-moves": ((":a:b", "c", None), (":a", "b:c", None)),
    "brace-moves": (("q}", "r", None), ("q", "}r", None)),
    "route-target": (("", "a:b", "c"), ("", "a", "b:c")),
}


def _refused(kind: str, exc: ConfigurationError) -> None:
    assert kind in MAY_REFUSE, f"a {kind!r} name must be accepted, not refused: {exc}"
    assert str(exc) and "\n" not in str(exc), repr(str(exc))


class NameSuite:
    """Conformance tests about names; fixtures come from ConformanceSuite."""

    @pytest.mark.parametrize("kind", sorted(HOSTILE))
    def test_hostile_queue_name_round_trips(self, backend: BackendUnderTest, kind: str) -> None:
        # The hostile part first: a name that starts with '}' is what broke Redis Cluster's hash tag.
        name = f"{HOSTILE[kind]}-{uuid.uuid4().hex[:8]}"
        try:
            store = backend.open(name)
        except ConfigurationError as exc:
            _refused(kind, exc)
            return
        try:
            record = make_record(name)
            store.enqueue([record])
            got = store.get(record.id)
            assert got is not None and got.queue == name
            [claimed] = store.claim("r", "w", 10)
            assert (claimed.id, claimed.queue) == (record.id, name)
            assert store.finish(claimed.id, claimed.token, policy.completed(b"ok"))
            done = store.get(record.id)
            assert done is not None and (done.state, done.result) == (COMPLETE, b"ok")
            assert store.counts() == {("r", COMPLETE): 1}
            assert [r.id for r in store.list_jobs()] == [record.id]
        finally:
            store.close()

    @pytest.mark.parametrize("kind", sorted(HOSTILE))
    def test_hostile_route_and_target_names_round_trip(self, store: Persistence, queue_name: str,
                                                       kind: str) -> None:
        route = HOSTILE[kind]
        try:
            type(store).check_names(queue_name, [route])
        except ConfigurationError as exc:
            _refused(kind, exc)
            return
        plain, broadcast, elsewhere = (make_record(queue_name, route), make_record(queue_name, route, target=route),
                                       make_record(queue_name, "other"))
        store.enqueue([plain, broadcast, elsewhere])
        got = store.get(broadcast.id)
        assert got is not None and (got.route, got.target) == (route, route)
        assert [r.id for r in store.claim(route, "w", 10, limit=5)] == [plain.id]
        [taken] = store.claim(route, route, 10, limit=5)
        assert (taken.id, taken.route, taken.target) == (broadcast.id, route, route)
        assert store.counts()[(route, "running")] == 2
        assert {r.id for r in store.list_jobs(route=route)} == {plain.id, broadcast.id}
        again = make_record(queue_name, route, target=route)
        store.enqueue([again])
        assert store.purge(route, target=route) == 1 and store.get(again.id) is None
        [other] = store.claim("other", "w", 10, limit=5)
        assert other.id == elsewhere.id

    @pytest.mark.parametrize("pair", sorted(COLLIDING))
    def test_names_that_could_collide_stay_apart(self, backend: BackendUnderTest, queue_name: str,
                                                 pair: str) -> None:
        stores, records = [], []
        try:
            for queue_suffix, route, target in COLLIDING[pair]:
                store = backend.open(queue_name + queue_suffix)
                stores.append(store)
                record = make_record(store.queue, route, target=target)
                store.enqueue([record])
                records.append(record)
            (first, second), (one, two) = stores, records
            (_, route_1, target_1), (_, route_2, target_2) = COLLIDING[pair]
            if first.queue != second.queue:
                assert first.get(two.id) is None and second.get(one.id) is None
                assert first.counts() == {(route_1, PENDING): 1} and second.counts() == {(route_2, PENDING): 1}
                assert [r.id for r in second.list_jobs()] == [two.id]
                assert second.purge(route_1, target=target_1) == 0
                assert first.claim(route_2, target_2 or "w", 10, limit=5) == []
            # Each claim finds its own record and never the other's.
            [got_one] = first.claim(route_1, target_1 or "w", 10, limit=5)
            [got_two] = second.claim(route_2, target_2 or "w", 10, limit=5)
            assert (got_one.id, got_two.id) == (one.id, two.id)
        finally:
            for store in stores:
                store.close()
