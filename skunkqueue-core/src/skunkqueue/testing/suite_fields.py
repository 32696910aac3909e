"""The field rules, held against the store: claim and finish write what the core's rules say.

``JobRecord.claim_by`` and ``Outcome.apply_to`` spell out which fields a claim
and a finish change. A store that runs these steps as server-side scripts or
queries spells the rules again; these tests compare the two field by field.
Also: payloads up to the backend's ``max_payload``, and claiming from several
processes at once (not only threads of one process).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from typing import Any

import pytest

from skunkqueue import headers, housekeeping, policy, signing
from skunkqueue.persistence import Persistence
from skunkqueue.record import ERROR, KILLED, KILLED_BY_REQUEST, PENDING, RUNNING, JobRecord, Outcome
from skunkqueue.testing.kit import BackendUnderTest
from skunkqueue.testing.suite_support import make_record

# The largest payload the kit sends: a backend's limit can be far above what a
# test should move (Redis: 512 MiB).
KIT_PAYLOAD_CAP = 16 * 1024 * 1024

OUTCOMES = [
    policy.completed(b"\x00result"),
    Outcome(ERROR, error={"type": "E", "message": "m", "traceback": "t"}, dead=True),
    Outcome(PENDING, error={"type": "E", "message": "retry", "traceback": ""}, due=12345.5),
    Outcome(KILLED, error={"type": "JobKilled", "message": "k", "traceback": ""}, finished=time.time() - 60),
    Outcome(PENDING, attempts=0),
    policy.quarantined("the kit's malformed record"),
]
OUTCOME_IDS = ["complete", "dead", "retry", "killed", "reset", "quarantined"]


def _same_but_for_clock_fields(actual: JobRecord, expected: JobRecord, now: float, fields: tuple[str, ...]) -> None:
    """Compare two records field by field.

    ``fields`` are times: those set from "now" are read on each side, so may
    differ by seconds; the others may differ by the store's float precision
    (Redis keeps about 16 digits).
    """
    got, want = actual.to_dict(), expected.to_dict()
    for name in fields:
        if want[name] is not None:
            slack = 5.0 if abs(want[name] - now) < 60 else 1e-3
            assert got[name] is not None and abs(got.pop(name) - want.pop(name)) < slack, name
    assert got == want, {k: (got.get(k), want.get(k)) for k in set(got) | set(want) if got.get(k) != want.get(k)}


def _claim_all(backend: BackendUnderTest, queue: str, worker: str, out: Any) -> None:
    """One claiming process: take batches until the route is empty, report the ids taken."""
    with backend.open(queue) as store:
        mine: list[str] = []
        while batch := store.claim("r", worker, 30, limit=5):
            mine += [r.id for r in batch]
        out.put(mine)


KILL_ROUTES_BACK = ["finish", "finish_and_claim", "lease_lost"]


def kill_then_hand_back(store: Persistence, queue_name: str, via: str) -> tuple[JobRecord, JobRecord]:
    """Claim a job, request its kill, then send it back towards pending ``via`` one of KILL_ROUTES_BACK.

    Returns (the claimed record, the record as stored afterwards). Backends
    check their own expiry bookkeeping on the result.
    """
    # Due a second ago: what is checked is the kill, not how exactly a store compares "due now"
    # (MongoDB's $$NOW has millisecond precision, so a record due this instant can wait 1 ms).
    due = time.time() - 1
    job, other = make_record(queue_name, due=due), make_record(queue_name, due=due)
    store.enqueue([job])
    [claimed] = store.claim("r", "w", 0.3 if via == "lease_lost" else 10)
    assert store.request_kill(job.id)
    if via == "finish":
        error = {"type": "E", "message": "m", "traceback": ""}
        assert store.finish(job.id, claimed.token, Outcome(PENDING, error=error, due=time.time(), attempts=0))
    elif via == "finish_and_claim":
        store.enqueue([other])
        applied, taken = store.finish_and_claim(job.id, claimed.token, Outcome(PENDING, due=time.time()),
                                                "r", "w", 10)
        assert applied and [r.id for r in taken] == [other.id]
    else:
        time.sleep(0.4)
        assert housekeeping.recover_expired_leases(store) == 1
    final = store.get(job.id)
    assert final is not None
    return claimed, final


class FieldRulesSuite:
    """Mixed into :class:`~skunkqueue.testing.ConformanceSuite`; needs its ``store`` and ``backend`` fixtures."""

    def test_claim_agrees_with_claim_by(self, store: Persistence, queue_name: str) -> None:
        record = make_record(queue_name, retries=2)
        record.error = {"type": "E", "message": "an earlier failure stays visible", "traceback": ""}
        store.enqueue([record])
        before = time.time()
        [claimed] = store.claim("r", "w1", lease=10)
        expected = dataclasses.replace(record)
        expected.claim_by("w1", before, 10)
        _same_but_for_clock_fields(claimed, expected, before, ("started", "lease_until"))
        stored = store.get(record.id)
        assert stored is not None
        _same_but_for_clock_fields(stored, expected, before, ("started", "lease_until"))

    @pytest.mark.parametrize("outcome", OUTCOMES, ids=OUTCOME_IDS)
    def test_finish_agrees_with_outcome_apply_to(self, store: Persistence, queue_name: str,
                                                 outcome: Outcome) -> None:
        store.enqueue([make_record(queue_name)])
        [claimed] = store.claim("r", "w", 10)
        # A requested kill turns a pending outcome into killed; every other outcome clears the flag.
        if outcome.state != PENDING:
            assert store.request_kill(claimed.id)
            claimed.kill_requested = True
        before = time.time()
        assert store.finish(claimed.id, claimed.token, outcome)
        got = store.get(claimed.id)
        assert got is not None
        _same_but_for_clock_fields(got, outcome.apply_to(claimed, before), before, ("finished", "due"))

    def test_payloads_up_to_max_payload_round_trip(self, store: Persistence, queue_name: str) -> None:
        limit = store.max_payload
        size = KIT_PAYLOAD_CAP if limit is None else min(limit, KIT_PAYLOAD_CAP)
        # Every byte value, in no repeating pattern a store could shortcut.
        payload = (bytes(range(256)) * (size // 256 + 1))[:size]
        payload = payload[::2] + payload[1::2]
        record = make_record(queue_name, payload=payload)
        store.enqueue([record])
        [claimed] = store.claim("r", "w", 10)
        assert len(claimed.payload) == size and claimed.payload == payload
        # A small result: a payload and a result both at the limit need not fit one record (MongoDB: 16 MB).
        assert store.finish(claimed.id, claimed.token, policy.completed(b"done"))
        done = store.get(record.id)
        assert done is not None and done.result == b"done" and done.payload == payload

    def test_headers_travel_with_the_record(self, store: Persistence, queue_name: str) -> None:
        # Headers (a trace context) ride in the payload, signed with it: the store must give
        # back every byte, through enqueue, claim, a retry and a finish.
        sent = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "tracestate": "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7", "odd": "{}:$.\u00e9"}
        body = b'[[1,"two"],{}]'
        record = make_record(queue_name, payload=signing.body(headers.wrap(sent, body)))
        signing.sign(b"kit key", record)
        store.enqueue([record])
        [claimed] = store.claim("r", "w", 10)
        assert headers.of(claimed) == sent and headers.arguments(claimed.payload) == body
        signing.verify(b"kit key", claimed)
        assert store.finish(claimed.id, claimed.token, Outcome(PENDING, due=0.0))
        [again] = store.claim("r", "w", 10)
        assert again.payload == record.payload
        assert store.finish(again.id, again.token, policy.completed(b"done"))
        done = store.get(record.id)
        assert done is not None and headers.of(done) == sent

    def test_claiming_processes_get_each_record_once(self, backend: BackendUnderTest, store: Persistence,
                                                     queue_name: str) -> None:
        records = [make_record(queue_name) for _ in range(600)]
        store.enqueue(records)
        # spawn: a fresh interpreter per claimer, as separate worker hosts would be.
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        plain = dataclasses.replace(backend, inject_foreign=None, misfile=None)  # callables need not pickle
        procs = [ctx.Process(target=_claim_all, args=(plain, queue_name, f"w{i}", out)) for i in range(4)]
        for proc in procs:
            proc.start()
        taken = [out.get(timeout=120) for _ in procs]
        for proc in procs:
            proc.join(30)
        everything = [job_id for ids in taken for job_id in ids]
        assert len(everything) == len(set(everything)) == 600
        assert store.counts() == {("r", RUNNING): 600}

    @pytest.mark.parametrize("via", KILL_ROUTES_BACK)
    def test_a_killed_record_never_goes_back_to_pending(self, store: Persistence, queue_name: str,
                                                        via: str) -> None:
        claimed, final = kill_then_hand_back(store, queue_name, via)
        assert final.state == KILLED, final
        assert final.error == KILLED_BY_REQUEST
        # An outcome's own attempts (a hand-back uncharges the claim) survive the kill.
        assert (final.dead, final.result, final.owner, final.lease_until, final.kill_requested, final.attempts) == (
            False, None, None, None, False, 0 if via == "finish" else 1)
        assert final.finished is not None and abs(final.finished - time.time()) < 5
        assert store.claim("r", "w2", 10) == []
        waited = store.wait_finished(final.id, 1)
        assert waited is not None and waited.state == KILLED
        assert not store.finish(final.id, claimed.token + 1, Outcome(PENDING, due=time.time()))
