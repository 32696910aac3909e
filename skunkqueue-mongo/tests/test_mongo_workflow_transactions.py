"""Workflows on a replica set: a parent's finish and its dependents' count-down are one transaction.

Hostile cases on a real replica set (one node; the step-down on three): the
transaction cut short after the finish's write (the process "dies" in it, the
commit is refused as transient, the commit's connection is dropped, a read's
connection is dropped) leaves either no trace or the whole of it, and the
finish repeated afterwards does what is left once; members finishing at the
same instant release their callback once; a stale finish counts nothing, inside
a transaction too; a primary stepping down mid-transaction loses and doubles
nothing. A plain job's finish stays one round trip. Claims of the dependents
are appended to a file outside the queue and counted there.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import mongo_servers as servers
import pytest
from pymongo import MongoClient

from skunkqueue import dependencies, policy
from skunkqueue.errors import BackendUnavailable, RecordHeld
from skunkqueue.record import COMPLETE, PENDING, RUNNING, JobRecord, Outcome
from skunkqueue.testing.suite_support import make_record
from skunkqueue_mongo.persistence import MongoPersistence

DB = "skunkqueue_wf_txn"


def _with_app(url: str, app: str) -> str:
    sep = "&" if "?" in url else "/?"
    return (url if url.startswith("mongodb://") else f"mongodb://{url}") + f"{sep}appName={app}"


@pytest.fixture
def app() -> str:
    return f"victim-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def store(mongo_replset: Any, app: str, queue_name: str) -> Iterator[MongoPersistence]:
    opened = MongoPersistence(queue_name, url=_with_app(mongo_replset.url, app), db=DB)
    assert opened.transactions, "a replica set was not recognised"
    yield opened
    opened.close()


@pytest.fixture
def admin(mongo_replset: Any) -> Iterator[MongoClient[dict[str, Any]]]:
    with mongo_replset.client() as client:
        yield client
        client.admin.command("configureFailPoint", "failCommand", mode="off")


def _fail(admin: MongoClient[dict[str, Any]], app: str, commands: list[str], times: int = 1,
          **data: Any) -> None:
    admin.admin.command("configureFailPoint", "failCommand", mode={"times": times},
                        data={"failCommands": commands, "appName": app, **data})


def _waiting(queue: str, *parents: str) -> JobRecord:
    return make_record(queue, parents=list(parents), due=dependencies.WAITING_DUE)


class Claims:
    """Every claim appended to a file (one line: id and token), read back to count them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()

    def claim(self, store: MongoPersistence, limit: int = 100) -> list[JobRecord]:
        claimed = store.claim("r", f"w-{threading.get_ident()}", 30, limit=limit)
        with self.lock, self.path.open("a") as log:
            for record in claimed:
                log.write(f"{record.id} {record.token}\n")
        return claimed

    def count(self, job_id: str) -> int:
        if not self.path.exists():
            return 0
        return sum(1 for line in self.path.read_text().splitlines() if line.split()[0] == job_id)


@pytest.fixture
def claims(tmp_path: Path) -> Claims:
    return Claims(tmp_path / "claims.log")


def _counted(store: MongoPersistence, child: str) -> int:
    """How many parents the store holds in the child's set (settled documents)."""
    return store.settled.count_documents({"child": child})


def _state(store: MongoPersistence, job_id: str) -> tuple[str, int | None, bool]:
    """(state, token, waiting) of a record."""
    record = store.get(job_id)
    assert record is not None
    return record.state, record.token, dependencies.waiting(record)


def _finish_as_worker(store: MongoPersistence, job_id: str, token: int, outcome: Outcome,
                      within: float = 60.0) -> bool:
    """finish, repeated on BackendUnavailable as a worker does (``_finish_when_back``)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return store.finish(job_id, token, outcome)
        except BackendUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _command_counts(admin: MongoClient[dict[str, Any]]) -> dict[str, int]:
    commands = admin.admin.command("serverStatus")["metrics"]["commands"]
    return {name: int(c["total"]) for name, c in commands.items() if isinstance(c, dict) and "total" in c}


def _round_trips(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The commands run between two serverStatus reads, less monitoring and the reads themselves."""
    ignored = {"hello", "isMaster", "ismaster", "serverStatus", "endSessions", "ping", "buildInfo"}
    return {name: after[name] - before.get(name, 0) for name in after
            if name not in ignored and after[name] != before.get(name, 0)}


def test_a_plain_finish_is_one_round_trip_and_a_parents_finish_one_transaction(
        store: MongoPersistence, admin: MongoClient[dict[str, Any]]) -> None:
    plain, parent = make_record(store.queue), make_record(store.queue)
    child = _waiting(store.queue, parent.id)
    store.enqueue([plain, parent, child])
    store.now()  # the clock estimate is fresh: no hello inside what is counted
    for record in (plain, parent):
        [running] = store.claim("r", "w", 30)
        assert running.id == record.id
        before = _command_counts(admin)
        assert store.finish(record.id, running.token, policy.completed(b"1"))
        trips = _round_trips(before, _command_counts(admin))
        if record is plain:
            assert trips == {"findAndModify": 1}, trips
        else:
            # Claimed with dependents, so no plain update first: one transaction, the count-down
            # (the set's upsert, the hint's decrement, the count of the set, the release), the
            # fenced update of the record last, and the commit.
            print("a parent's finish:", trips)
            assert trips.get("commitTransaction") == 1 and trips.get("findAndModify") == 2, trips
            assert trips.get("aggregate") == 1 and sum(trips.values()) <= 9, trips
    assert [r.id for r in store.claim("r", "w", 30)] == [child.id]
    doc = store.jobs.find_one({"_id": parent.id})
    assert doc is not None and "settle_pending" not in doc


@pytest.mark.parametrize("ends", ["complete", "fail"])
def test_a_fan_out_is_counted_down_a_thousand_dependents_at_a_time(
        store: MongoPersistence, admin: MongoClient[dict[str, Any]], ends: str) -> None:
    # One trip per step and dependent (five each) made a fan-out of ten thousand a transaction
    # that outlived MongoDB's 60 s on a loaded CI machine, which aborted it (NoSuchTransaction).
    # 1,250 dependents: two batches of SETTLE_BATCH, so batching across them is covered too.
    parent = make_record(store.queue)
    anyway = [make_record(store.queue, parents=[parent.id], due=dependencies.WAITING_DUE, on_failure="run")
              for _ in range(625)]
    others = [_waiting(store.queue, parent.id) for _ in range(625)]
    store.enqueue([parent, *anyway, *others])
    store.now()
    [running] = store.claim("r", "w", 30)
    outcome = (policy.completed(b"1") if ends == "complete"
               else policy.failed(running, {"type": "ValueError", "message": "x", "traceback": ""}))
    before = _command_counts(admin)
    assert store.finish(parent.id, running.token, outcome)
    trips = _round_trips(before, _command_counts(admin))
    print(f"a finish with {len(anyway) + len(others)} dependents ({ends}):", trips)
    assert trips.get("commitTransaction") == 1 and sum(trips.values()) <= 40, trips
    states = {record.id: record for record in store.get_many([r.id for r in anyway + others]) if record}
    released = [r for r in anyway + others if not dependencies.waiting(states[r.id])]
    if ends == "complete":
        assert len(released) == 1250 and all(states[r.id].state == PENDING for r in released)
    else:
        assert {states[r.id].state for r in others} == {"killed"}
        assert all(states[r.id].state == PENDING and not dependencies.waiting(states[r.id]) for r in anyway)
    assert store.waits.count_documents({"_id": {"$in": [r.id for r in anyway + others]}}) == 0


def test_the_process_dying_inside_the_transaction_leaves_no_half_state(
        store: MongoPersistence, claims: Claims, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = make_record(store.queue), make_record(store.queue)
    c = _waiting(store.queue, a.id, b.id)
    store.enqueue([a, b, c])
    [ra, rb] = claims.claim(store, limit=2)
    assert store.finish(rb.id, rb.token, policy.completed(b"2"))
    assert _counted(store, c.id) == 1
    settle = store._settle_finished

    class Died(Exception):
        pass

    def count_then_die(job_id: str, **kwargs: Any) -> None:
        settle(job_id, **kwargs)  # a's finish written, c counted and released: all inside the transaction
        raise Died("SIGKILL before the commit")

    with monkeypatch.context() as patched:
        patched.setattr(store, "_settle_finished", count_then_die)
        with pytest.raises(Died):
            store.finish(ra.id, ra.token, policy.completed(b"1"))
    # Nothing of it is left: a is running under its token, c waits, its set holds b only.
    assert _state(store, a.id) == (RUNNING, ra.token, False)
    assert _state(store, c.id)[2], "the dependent was released by an aborted transaction"
    assert _counted(store, c.id) == 1
    assert claims.claim(store) == []
    # The worker's repeat (or housekeeping's hand-back) does all of it, once.
    assert store.finish(ra.id, ra.token, policy.completed(b"1"))
    assert not store.finish(ra.id, ra.token, policy.completed(b"1")), "a repeated finish applied"
    assert _state(store, a.id)[0] == COMPLETE and _counted(store, c.id) == 2
    assert [r.id for r in claims.claim(store)] == [c.id]
    assert claims.claim(store) == [] and claims.count(c.id) == 1
    assert store.release_stranded() == 0


@pytest.mark.parametrize("fault", ["commit-transient", "commit-connection", "read-connection", "write-connection"])
def test_a_transaction_cut_short_is_retried_and_counts_once(
        store: MongoPersistence, admin: MongoClient[dict[str, Any]], app: str, claims: Claims, fault: str) -> None:
    a, b = make_record(store.queue), make_record(store.queue)
    c = _waiting(store.queue, a.id, b.id)
    store.enqueue([a, b, c])
    [ra, rb] = claims.claim(store, limit=2)
    assert store.finish(rb.id, rb.token, policy.completed(b"2"))
    if fault == "commit-transient":
        # Refused as a write conflict: with_transaction runs the whole transaction again.
        _fail(admin, app, ["commitTransaction"], errorCode=112, errorLabels=["TransientTransactionError"])
    elif fault == "commit-connection":
        # The commit's reply lost: its result is unknown, and the commit alone is sent again.
        _fail(admin, app, ["commitTransaction"], closeConnection=True)
    elif fault == "read-connection":
        _fail(admin, app, ["find"], closeConnection=True)  # the dependents' edges, read in the transaction
    else:
        _fail(admin, app, ["update"], closeConnection=True)  # the set's upsert, in the transaction
    assert _finish_as_worker(store, ra.id, ra.token, policy.completed(b"1"))
    fired = admin.admin.command("configureFailPoint", "failCommand", mode="off").get("count")
    assert fired and fired >= 1, "the fault never struck"
    assert _state(store, a.id)[0] == COMPLETE
    assert _counted(store, c.id) == 2
    assert store.waits.find_one({"_id": c.id}) is None
    assert [r.id for r in claims.claim(store)] == [c.id]
    assert not store.finish(ra.id, ra.token, policy.completed(b"1")), "a repeated finish applied"
    assert claims.claim(store) == [] and claims.count(c.id) == 1
    assert _counted(store, c.id) == 2


def test_a_stale_finish_counts_nothing_inside_a_transaction(store: MongoPersistence, claims: Claims) -> None:
    a, b = make_record(store.queue), make_record(store.queue)
    c = _waiting(store.queue, a.id, b.id)
    store.enqueue([a, b, c])
    claimed = {r.id: r for r in claims.claim(store, limit=2)}
    first, rb = claimed[a.id], claimed[b.id]
    # The lease ran out and housekeeping handed a back; another worker runs it now.
    assert store.finish(a.id, first.token, Outcome(PENDING, due=time.time()))
    [second] = claims.claim(store)
    assert second.id == a.id and second.token > first.token
    for state in (policy.completed(b"late"), policy.killed("late")):
        assert not store.finish(a.id, first.token, state), "a stale finish applied"
    assert _counted(store, c.id) == 0
    wait = store.waits.find_one({"_id": c.id})
    assert wait is not None and wait["left"] == 2
    assert store.finish(a.id, second.token, policy.completed(b"1"))
    assert store.finish(b.id, rb.token, policy.completed(b"2"))
    assert [r.id for r in claims.claim(store)] == [c.id] and claims.count(c.id) == 1
    assert _counted(store, c.id) == 2


@pytest.mark.parametrize("members", [2, 8])
def test_members_finishing_at_once_release_the_callback_once(
        mongo_replset: Any, queue_name: str, claims: Claims, members: int) -> None:
    stores = [MongoPersistence(queue_name, url=mongo_replset.url, db=DB) for _ in range(members)]
    try:
        for _ in range(4 if members == 8 else 10):
            group = [make_record(queue_name) for _ in range(members)]
            callback = _waiting(queue_name, *(r.id for r in group))
            stores[0].enqueue([*group, callback])
            running = {r.id: r for r in claims.claim(stores[0], limit=members)}
            assert sorted(running) == sorted(r.id for r in group)
            start = threading.Barrier(members)
            results: list[Any] = []

            def finish(store: MongoPersistence, record: JobRecord, start: threading.Barrier,
                       results: list[Any]) -> None:
                start.wait()
                try:
                    results.append(store.finish(record.id, record.token, policy.completed(b"1")))
                except Exception as exc:
                    results.append(exc)
                # Every finisher looks for the callback at once, as idle workers would.
                claims.claim(store)

            threads = [threading.Thread(target=finish, args=(store, running[r.id], start, results))
                       for store, r in zip(stores, group)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert results == [True] * members
            claims.claim(stores[0])
            assert claims.count(callback.id) == 1, "the callback was released twice, or never"
            assert _counted(stores[0], callback.id) == members
            assert stores[0].waits.find_one({"_id": callback.id}) is None
    finally:
        for store in stores:
            store.close()


# -- a primary stepping down mid-transaction (three members) -----------------------------------


@pytest.fixture(scope="module")
def replset3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.MongoReplicaSet]:
    started = servers.MongoReplicaSet(tmp_path_factory.mktemp("mongo-rs3-txn"))
    try:
        yield started.start()
    finally:
        started.stop()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("blocked", ["find", "commitTransaction"])
def test_a_step_down_mid_transaction_loses_and_doubles_nothing(
        replset3: servers.MongoReplicaSet, queue_name: str, app: str, claims: Claims, blocked: str) -> None:
    replset3.wait_healthy()
    store = MongoPersistence(queue_name, url=_with_app(replset3.url, app), db=DB)
    try:
        a, b = make_record(queue_name), make_record(queue_name)
        c = _waiting(queue_name, a.id, b.id)
        store.enqueue([a, b, c])
        [ra, rb] = claims.claim(store, limit=2)
        assert store.finish(rb.id, rb.token, policy.completed(b"2"))
        primary = replset3.wait_primary()
        with primary.client() as admin:
            # The transaction's read of the edges, or its commit, waits 3 s on the primary; the
            # primary steps down meanwhile (which aborts the transactions it holds).
            _fail(admin, app, [blocked], blockConnection=True, blockTimeMS=3000)
        outcome: list[Any] = []

        def finish() -> None:
            try:
                outcome.append(_finish_as_worker(store, ra.id, ra.token, policy.completed(b"1"), within=120))
            except Exception as exc:
                outcome.append(exc)

        finisher = threading.Thread(target=finish)
        finisher.start()
        time.sleep(1.0)
        replset3.step_down(primary, seconds=10)
        replset3.wait_primary(other_than=primary)
        finisher.join(180)
        with primary.client() as admin:
            admin.admin.command("configureFailPoint", "failCommand", mode="off")
        # True, or False when a commit that did apply was followed by a repeat (fenced off).
        assert outcome in ([True], [False]), outcome
        assert _state(store, a.id)[0] == COMPLETE
        assert not store.finish(ra.id, ra.token, policy.completed(b"1"))
        deadline = time.monotonic() + 30
        while not claims.count(c.id) and time.monotonic() < deadline:
            claims.claim(store)
            time.sleep(0.2)
        claims.claim(store)
        assert claims.count(c.id) == 1, "the dependent was lost or released twice"
        assert _counted(store, c.id) == 2
        assert store.release_stranded() == 0
    finally:
        store.close()


def test_a_standalone_keeps_the_idempotent_count_down(mongo_standalone: Any, queue_name: str) -> None:
    store = MongoPersistence(queue_name, url=mongo_standalone.url, db=DB)
    try:
        assert not store.transactions
    finally:
        store.close()



# -- a worker SIGKILLed inside the transaction ------------------------------------------------------

FINISH_THEN_HANG = """
import sys
from skunkqueue import policy
from skunkqueue_mongo.persistence import MongoPersistence
store = MongoPersistence(sys.argv[1], url=sys.argv[2], db=sys.argv[3])
print("ready", flush=True)
store.finish(sys.argv[4], int(sys.argv[5]), policy.completed(b"1"))
print("finished", flush=True)
"""


@pytest.fixture
def short_transactions(admin: MongoClient[dict[str, Any]]) -> Iterator[int]:
    """MongoDB aborts a transaction left open this many seconds (default 60; the test waits it out)."""
    old = admin.admin.command("getParameter", 1, transactionLifetimeLimitSeconds=1)["transactionLifetimeLimitSeconds"]
    admin.admin.command("setParameter", 1, transactionLifetimeLimitSeconds=10)
    yield 10
    admin.admin.command("setParameter", 1, transactionLifetimeLimitSeconds=old)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("killed_in", ["count-down", "parent-write", "commit"])
def test_a_worker_sigkilled_inside_the_transaction_leaves_all_or_nothing(
        store: MongoPersistence, admin: MongoClient[dict[str, Any]], app: str, claims: Claims,
        short_transactions: int, mongo_replset: Any, killed_in: str) -> None:
    import signal
    import subprocess
    import sys

    a, b = make_record(store.queue), make_record(store.queue)
    c = _waiting(store.queue, a.id, b.id)
    store.enqueue([a, b, c])
    claimed = {r.id: r for r in claims.claim(store, limit=2)}
    ra, rb = claimed[a.id], claimed[b.id]
    assert store.finish(rb.id, rb.token, policy.completed(b"2"))
    # The victim's commands (its appName) stall on the server at the chosen point; it is SIGKILLed
    # there. findAndModify: the plain try (1), the count's decrement (2), the parent's write (3).
    if killed_in == "count-down":
        _fail(admin, app, ["update"], blockConnection=True, blockTimeMS=3000)  # the set's upsert
    elif killed_in == "parent-write":
        admin.admin.command("configureFailPoint", "failCommand", mode={"skip": 2}, data={
            "failCommands": ["findAndModify"], "appName": app, "blockConnection": True, "blockTimeMS": 3000})
    else:
        _fail(admin, app, ["commitTransaction"], blockConnection=True, blockTimeMS=3000)
    victim = subprocess.Popen([sys.executable, "-c", FINISH_THEN_HANG, store.queue,
                               _with_app(mongo_replset.url, app), DB, a.id, str(ra.token)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout is not None and victim.stdout.readline().strip() == "ready"
        time.sleep(2.0)  # inside the stalled command by now
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(10) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
    admin.admin.command("configureFailPoint", "failCommand", mode="off")
    record = store.get(a.id)
    assert record is not None
    if killed_in == "parent-write":
        assert record.owner is not None
        time.sleep(1.5)  # the stalled write has run inside the dead transaction by now
        # The pool renewing the dead worker's lease is told nothing of it instead of waiting.
        began = time.monotonic()
        assert store.renew(record.owner, [(a.id, ra.token)], 30) == {}
        assert time.monotonic() - began < 10
    # The pool (or housekeeping) hands the dead worker's job back (WorkerDied: retried). While the
    # dead transaction holds the parent each try gives up after LOCK_WAIT_MS (RecordHeld); once
    # MongoDB has aborted the transaction, the hand-back goes through.
    tries: list[float] = []
    began = time.monotonic()
    while True:
        tried = time.monotonic()
        try:
            handed_back = store.finish(a.id, ra.token, policy.worker_died(record, "WorkerDied", "SIGKILL"))
            break
        except RecordHeld:
            tries.append(time.monotonic() - tried)
            assert time.monotonic() - began < short_transactions + 60, "held past the transaction's lifetime"
            time.sleep(0.5)
    print(f"{killed_in}: the hand-back was held {len(tries)} times, {time.monotonic() - began:.1f} s")
    assert all(t < 10 for t in tries), f"a try waited for the transaction: {tries}"
    if killed_in == "parent-write":
        assert tries, "the dead transaction did not hold the parent"
    if killed_in == "commit":
        # The commit reached the server before the kill: all of it is done, the hand-back fenced off.
        assert not handed_back and _state(store, a.id)[0] == COMPLETE and _counted(store, c.id) == 2
    else:
        # Nothing of it is left: a is pending again (charged), c waits with b alone in its set.
        assert handed_back and _state(store, a.id)[0] == PENDING
        assert _counted(store, c.id) == 1 and _state(store, c.id)[2]
        [again] = claims.claim(store)
        assert again.id == a.id
        assert store.finish(a.id, again.token, policy.completed(b"1"))
    assert [r.id for r in claims.claim(store)] == [c.id]
    assert claims.claim(store) == [] and claims.count(c.id) == 1
    assert _counted(store, c.id) == 2
    assert store.release_stranded() == 0


# -- a dependent attached while its parent's finishing transaction is open ------------------------


def test_a_dependent_attached_during_its_parents_transaction_is_counted(
        mongo_replset: Any, store: MongoPersistence, claims: Claims, monkeypatch: pytest.MonkeyPatch) -> None:
    """A producer attaches a second dependent between the transaction's snapshot and its commit.

    ``fire()`` stores a workflow's records first and attaches the dependents one by one after, so
    a parent that already has one dependent can be claimed, run and finished while the next is
    being attached. The finish's transaction read the parent's edges at its snapshot, before the
    new edge; the producer's read of the parent, after its mark, still sees it running (the
    transaction has not committed). Unless the mark is a write that the transaction's own write
    of the parent then conflicts with, neither side counts the new dependent and it waits forever
    (CI: "a job still pending" in chains and groups on the replica set, under load).
    """
    parent = make_record(store.queue)
    first = _waiting(store.queue, parent.id)
    second = _waiting(store.queue, parent.id)
    store.enqueue([parent, first])
    [running] = claims.claim(store)
    assert running.id == parent.id
    producer = MongoPersistence(store.queue, url=mongo_replset.url, db=DB)
    attached: list[str] = []
    settle = store._settle_finished

    def settle_then_attach(job_id: str, *args: Any, **kwargs: Any) -> None:
        settle(job_id, *args, **kwargs)
        if job_id == parent.id and not attached:
            # Inside the transaction, after it read the parent and its edges, before it writes the
            # parent: the producer's whole attach (edge, mark, read of the parent) runs now.
            producer.enqueue([second])
            attached.append(second.id)

    monkeypatch.setattr(store, "_settle_finished", settle_then_attach)
    try:
        assert store.finish(parent.id, running.token, policy.completed(b"1"))
    finally:
        producer.close()
    assert attached == [second.id], "the attach did not run inside the transaction"
    assert _state(store, parent.id)[0] == COMPLETE
    released = sorted(r.id for r in claims.claim(store))
    assert released == sorted([first.id, second.id]), "a dependent attached mid-transaction was never counted"
    assert claims.count(first.id) == claims.count(second.id) == 1
