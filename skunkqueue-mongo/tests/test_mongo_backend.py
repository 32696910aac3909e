"""What the conformance kit cannot see: how the mongodb backend uses MongoDB.

Every test runs against a real mongod (see conftest.py); ``mongo`` runs a test
on both the standalone and the one-node replica set.
"""

from __future__ import annotations

import logging
import random
import statistics
import threading
import time
import uuid
from datetime import timezone
from pathlib import Path
from typing import Any, Callable

import clockskew
import pytest
from click.testing import CliRunner
from pymongo import MongoClient
from pymongo.collection import Collection

import skunkqueue_mongo.persistence as mongo_persistence
from skunkqueue import policy
from skunkqueue.backends import open_backend
from skunkqueue.cli import main as cli_main
from skunkqueue.errors import BackendUnavailable, ConfigurationError, MalformedRecord, PayloadTooLarge
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import COMPLETE, ERROR, KILLED, PENDING, RUNNING, Outcome
from skunkqueue.testing import BackendUnderTest, jobs
from skunkqueue.testing.kit import closed_port
from skunkqueue.testing.suite_fields import KILL_ROUTES_BACK, kill_then_hand_back
from skunkqueue.testing.suite_support import make_record, status_counts, wait_until
from skunkqueue.testing.workers import PoolProcess
from skunkqueue_mongo.persistence import MongoPersistence

DB = "skunkqueue_backend_tests"  # the `opened` fixture's (conftest.py)


def logged_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)


# == Addresses ==========================================================================

def test_host_port_and_uri_forms_reach_the_same_database(mongo_standalone: Any, opened: Any,
                                                         queue_name: str) -> None:
    by_host = opened(queue_name, mongo_standalone.host)
    by_uri = opened(queue_name, f"mongodb://{mongo_standalone.host}/")
    record = make_record(queue_name)
    by_host.enqueue([record])
    got = by_uri.get(record.id)
    assert got is not None and got.to_dict() == record.to_dict()


def test_database_comes_from_db_then_the_uri_then_the_default(mongo_standalone: Any, opened: Any) -> None:
    host = mongo_standalone.host
    assert opened("q", f"mongodb://{host}/fromuri", db=None).jobs.database.name == "fromuri"
    assert opened("q", f"mongodb://{host}/fromuri", db="explicit").jobs.database.name == "explicit"
    assert opened("q", host, db=None).jobs.database.name == "skunkqueue"


def test_notifies_only_where_change_streams_exist(mongo_standalone: Any, mongo_replset: Any,
                                                  opened: Any) -> None:
    assert opened("q", mongo_standalone.url).notifies is False
    assert opened("q", mongo_replset.url).notifies is True
    assert MongoPersistence.notifies is False  # decided per instance, never on the class


def test_credentials_in_the_uri_work(mongo_auth: Any, opened: Any, queue_name: str) -> None:
    store = opened(queue_name, mongo_auth.user_url(mongo_auth.user, mongo_auth.password))
    record = make_record(queue_name)
    store.enqueue([record])
    [claimed] = store.claim("r", "w", 10)
    assert claimed.id == record.id


def test_wrong_password_is_refused_without_showing_it(mongo_auth: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-Pa55word"
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        MongoPersistence("q", url=mongo_auth.user_url(mongo_auth.user, wrong), db=DB)
    assert time.monotonic() - started < 7
    message = str(info.value)
    assert "refused access" in message and f"mongodb://{mongo_auth.user}:***@{mongo_auth.host}" in message
    assert wrong not in message and wrong not in logged_text(caplog)


def test_no_credentials_on_an_auth_server_is_refused(mongo_auth: Any) -> None:
    with pytest.raises(BackendUnavailable, match="refused access"):
        MongoPersistence("q", url=mongo_auth.host, db=DB)


def test_cli_takes_everything_from_url_and_db(mongo_auth: Any, opened: Any, queue_name: str) -> None:
    url = mongo_auth.user_url(mongo_auth.user, mongo_auth.password)
    opened(queue_name, url).enqueue([make_record(queue_name), make_record(queue_name)])
    runner = CliRunner()
    base = ["-q", queue_name, "--backend", "mongodb", "--url", url, "--db", DB]
    status = runner.invoke(cli_main, ["status", *base])
    assert status.exit_code == 0, status.output
    assert status_counts(status.output) == {("r", PENDING): 2}
    wrong = runner.invoke(cli_main, ["status", "-q", queue_name, "--backend", "mongodb",
                                     "--url", mongo_auth.user_url(mongo_auth.user, "Wr0ng-pw"), "--db", DB])
    assert wrong.exit_code != 0 and "Wr0ng-pw" not in wrong.output and "Traceback" not in wrong.output


def test_unreachable_server_fails_fast_naming_the_redacted_address(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    port = closed_port()
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        MongoPersistence("q", url=f"127.0.0.1:{port}", db=DB)
    # The default server-selection timeout is 5 s, not pymongo's 30 s.
    assert time.monotonic() - started < 8
    assert f"127.0.0.1:{port}" in str(info.value)

    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        MongoPersistence("q", url=f"mongodb://app:hunter2secret@127.0.0.1:{port}/?serverSelectionTimeoutMS=300",
                         db=DB)
    assert time.monotonic() - started < 3, "a timeout in the URI wins over the default"
    assert f"mongodb://app:***@127.0.0.1:{port}" in str(info.value)
    assert "hunter2secret" not in str(info.value) and "hunter2secret" not in logged_text(caplog)


def test_malformed_uri_is_a_configuration_error_without_the_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        MongoPersistence("q", url="mongodb://app:hunter2secret@127.0.0.1:notaport/", db=DB)
    assert "hunter2secret" not in str(info.value) and "app:***@" in str(info.value)


# == Indexes and expiry =================================================================

def test_indexes_are_created_once_per_process_and_idempotently(mongo: Any, opened: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    first = opened("q", mongo.url)
    before = first.jobs.index_information()
    created: list[str] = []
    commands: list[str] = []
    original = Collection.create_indexes

    def counting(self: Collection[Any], indexes: Any, **kwargs: Any) -> list[str]:
        commands.append(self.name)
        created.extend(str(model.document["name"]) for model in indexes)
        return original(self, indexes, **kwargs)

    monkeypatch.setattr(Collection, "create_indexes", counting)
    opened("q2", mongo.url)
    assert created == [], "a second instance in the same process must not create indexes again"
    monkeypatch.setattr(mongo_persistence, "_indexed", set())
    opened("q3", mongo.url)
    assert sorted(commands) == sorted(set(commands)), "one command per collection"
    assert sorted(created) == ["claim_priority", "deps_expire", "deps_parent", "expire", "flow_expire", "flow_slot",
                               "key", "lease", "limit_key", "queue", "route_slot", "settle", "settled_child",
                               "settled_expire", "stats_expire", "stats_minute", "waits_expire"]
    assert first.jobs.index_information() == before
    assert before["claim_priority"]["key"] == [("queue", 1), ("route", 1), ("state", 1), ("target", 1),
                                               ("priority", -1), ("due", 1), ("_id", 1)]
    assert before["expire"]["key"] == [("expire_at", 1)] and before["expire"]["expireAfterSeconds"] == 0


def _explain_claim(store: MongoPersistence) -> dict[str, Any]:
    query = store.claim_filter("r", "w")
    explained = store.jobs.database.command(
        "explain", {"find": "jobs", "filter": query, "sort": dict(store.CLAIM_ORDER), "limit": 1},
        verbosity="executionStats")
    plan = str(explained["queryPlanner"]["winningPlan"])
    assert "'indexName': 'claim_priority'" in plan
    assert "'stage': 'SORT'" not in plan and "COLLSCAN" not in plan
    return dict(explained["executionStats"])


def test_claim_reads_a_few_index_entries_without_sorting(mongo: Any, opened: Any, queue_name: str) -> None:
    store = opened(queue_name, mongo.url)
    now = time.time()
    # Broadcasts for another worker sit at the head of the route; they must not be scanned.
    store.enqueue([make_record(queue_name, due=now - 100, target="someone-else") for _ in range(300)])
    store.enqueue([make_record(queue_name, due=now - 50) for _ in range(700)])
    small = _explain_claim(store)
    assert small["totalKeysExamined"] <= 3 and small["totalDocsExamined"] == 1
    # Higher priorities whose records are not due yet come first in the index: each such level costs one
    # index seek past it, not a read of its records.
    store.enqueue([make_record(queue_name, due=now + 600, priority=level) for level in (1, 2, 3) for _ in range(300)])
    assert _explain_claim(store)["totalKeysExamined"] <= 3 + 3
    # Ten times the backlog, due and not due: the claim reads as few entries as before.
    store.enqueue([make_record(queue_name, due=now - 50 + n / 1000) for n in range(7000)])
    store.enqueue([make_record(queue_name, due=now + 600, priority=level) for level in (1, 2, 3) for _ in range(3000)])
    large = _explain_claim(store)
    assert large["totalKeysExamined"] <= 3 + 3 and large["totalDocsExamined"] == 1


def test_finished_records_get_expire_at_and_the_ttl_monitor_deletes_them(mongo: Any, opened: Any,
                                                                        queue_name: str) -> None:
    store = opened(queue_name, mongo.url, result_ttl=1.0)
    done, waiting = make_record(queue_name), make_record(queue_name)
    store.enqueue([done, waiting])
    [claimed] = store.claim("r", "w", 10)
    assert store.jobs.find_one({"_id": claimed.id}, {"expire_at": 1}) == {"_id": claimed.id}
    assert store.finish(claimed.id, claimed.token, policy.completed(b"1"))
    finished = store.get(claimed.id)
    assert finished is not None and finished.finished is not None
    expire_at = store.jobs.find_one({"_id": claimed.id})["expire_at"].replace(tzinfo=timezone.utc)
    assert abs(expire_at.timestamp() - (finished.finished + 1.0)) < 0.01
    time.sleep(1.1)
    # Past expire_at the record is gone for callers even before the TTL monitor runs.
    assert store.get(claimed.id) is None and (("r", COMPLETE)) not in store.counts()
    wait_until(lambda: store.jobs.find_one({"_id": claimed.id}) is None, timeout=20,
               what="the TTL monitor to delete the record")
    assert store.get(waiting.id) is not None, "pending records never expire"


def test_retrying_a_dead_letter_clears_its_expiry(mongo: Any, opened: Any, queue_name: str) -> None:
    store = opened(queue_name, mongo.url)
    record = make_record(queue_name)
    store.enqueue([record])
    [claimed] = store.claim("r", "w", 10)
    error = {"type": "E", "message": "m", "traceback": ""}
    assert store.finish(record.id, claimed.token, Outcome(ERROR, error=error, dead=True))
    assert "expire_at" in store.jobs.find_one({"_id": record.id})
    assert store.finish(record.id, claimed.token, Outcome(PENDING, attempts=0), expect=ERROR)
    assert "expire_at" not in store.jobs.find_one({"_id": record.id}), "the TTL monitor would delete it"


# == Claims =============================================================================

def test_connections_to_one_server_share_one_estimate_of_its_clock(mongo_standalone: Any, opened: Any,
                                                                   queue_name: str) -> None:
    # A pool's scheduler moves a slot's due time by its estimate of the server's clock, and the
    # connection it fires through moves it back by its own: two estimates differ by their round
    # trips' asymmetry (a skewed pool's slot ran 16 ms early in CI). One estimate per server and
    # process makes the two moves cancel.
    first, second = opened(queue_name, mongo_standalone.url), opened(queue_name + "-other", mongo_standalone.url)
    first.now()
    second.now()
    assert first._clock is not None and first._clock == second._clock


def test_a_record_due_now_is_claimable_at_once(mongo_standalone: Any, opened: Any, queue_name: str) -> None:
    # $$NOW has whole milliseconds: compared as is, a record due "now" waits for the next one. Each
    # round has a chance to land inside that millisecond, so 300 rounds catch a regression most times.
    store = opened(queue_name, mongo_standalone.url)
    missed = 0
    for _ in range(300):
        store.enqueue([make_record(queue_name, due=time.time())])
        got = store.claim("r", "w", 10)
        missed += not got
        for record in got or store.claim("r", "w", 10):
            store.finish(record.id, record.token, policy.completed(b""))
    assert missed == 0, f"{missed} of 300 records due now were not claimable at once"


def test_fifo_by_due_then_creation_across_batches(mongo: Any, opened: Any, queue_name: str) -> None:
    store = opened(queue_name, mongo.url)
    now = time.time()
    records = [make_record(queue_name, due=now - 10 + (i // 10)) for i in range(50)]  # five equal-due groups
    shuffled = records[:]
    random.Random(7).shuffle(shuffled)
    for start in range(0, 50, 7):
        store.enqueue(shuffled[start:start + 7])
    order = [r.id for _ in range(10) for r in store.claim("r", "w", 10, limit=5)]
    assert order == [r.id for r in records]


def test_undecodable_record_is_quarantined_not_returned(mongo: Any, opened: Any, queue_name: str) -> None:
    store = opened(queue_name, mongo.url)
    store.jobs.insert_one({"_id": "bad-1", "queue": queue_name, "route": "r", "state": PENDING, "target": None,
                           "due": 0.0, "func": "no colon", "payload": b""})
    good = make_record(queue_name)
    store.enqueue([good])
    # A document without a priority (a foreign one, or one an older version stored before start-up
    # gave them 0) sorts after every priority: the good record comes first, then bad-1 is quarantined.
    assert [r.id for r in store.claim("r", "w", 10, limit=5)] == [good.id]
    bad = store.jobs.find_one({"_id": "bad-1"})
    assert (bad["state"], bad["dead"], bad["error"]["type"]) == (ERROR, True, "MalformedRecord")
    assert "module:name" in bad["error"]["message"] and "expire_at" in bad
    with pytest.raises(MalformedRecord):
        store.get("bad-1")
    assert [r.id for r in store.list_jobs()] == [good.id]


# The field rules (finish agrees with Outcome.apply_to) and payloads up to max_payload are kit tests
# (skunkqueue.testing.suite_fields); what is Mongo's own: a result too large for one document.

def test_a_result_over_max_payload_is_refused_at_finish(mongo_standalone: Any, opened: Any,
                                                        queue_name: str) -> None:
    store = opened(queue_name, mongo_standalone.url)
    store.enqueue([make_record(queue_name)])
    [claimed] = store.claim("r", "w", 10)
    with pytest.raises(PayloadTooLarge):
        store.finish(claimed.id, claimed.token, policy.completed(b"x" * (2 * MongoPersistence.max_payload)))
    still = store.get(claimed.id)
    assert still is not None and still.state == RUNNING


# == Waiting ============================================================================

def test_a_waiter_polls_the_state_and_reads_the_record_once_it_finished(mongo_standalone: Any, opened: Any,
                                                                        queue_name: str) -> None:
    # A callback's record names all its parents (10,000 ids for the kit's large group): a waiter
    # that read it whole every 100 ms made most of that test's CPU time, mongod's and its own.
    waiter, worker = opened(queue_name, mongo_standalone.url), opened(queue_name, mongo_standalone.url)
    record = make_record(queue_name)
    waiter.enqueue([record])
    [claimed] = worker.claim("r", "w", 10)
    full_reads: list[str] = []
    state_reads: list[str] = []
    get, look_again = waiter.get, waiter._look_again
    waiter.get = lambda job_id: full_reads.append(job_id) or get(job_id)  # type: ignore[method-assign]
    waiter._look_again = (  # type: ignore[method-assign]
        lambda job_id, last: state_reads.append(job_id) or look_again(job_id, last))
    still = waiter.wait_finished(record.id, 0.5)
    assert still is not None and still.state == RUNNING
    assert len(full_reads) == 1, "the first look only: the state stayed running"
    assert len(state_reads) >= 3
    full_reads.clear()
    threading.Timer(0.5, lambda: worker.finish(claimed.id, claimed.token, policy.completed(b"42"))).start()
    done = waiter.wait_finished(record.id, 10)
    assert done is not None and (done.state, done.result) == (COMPLETE, b"42")
    assert len(full_reads) == 2, "the first look and the one after the state changed"


def test_change_stream_wakes_an_idle_waiter_at_once(mongo_replset: Any, opened: Any, queue_name: str) -> None:
    waiter, producer = opened(queue_name, mongo_replset.url), opened(queue_name, mongo_replset.url)
    assert waiter.notifies
    timer = threading.Timer(0.3, lambda: producer.enqueue([make_record(queue_name)]))
    started = time.monotonic()
    timer.start()
    waiter.wait_for_work("r", "w", 5.0)
    elapsed = time.monotonic() - started
    assert 0.25 < elapsed < 0.8
    assert len(waiter.claim("r", "w", 10)) == 1


def test_change_stream_wakes_on_a_retry(mongo_replset: Any, opened: Any, queue_name: str) -> None:
    waiter, other = opened(queue_name, mongo_replset.url), opened(queue_name, mongo_replset.url)
    other.enqueue([make_record(queue_name)])
    [claimed] = other.claim("r", "w0", 30)
    timer = threading.Timer(0.3, lambda: other.finish(claimed.id, claimed.token, Outcome(PENDING)))
    started = time.monotonic()
    timer.start()
    waiter.wait_for_work("r", "w", 5.0)
    assert time.monotonic() - started < 0.8
    assert [r.id for r in waiter.claim("r", "w", 10)] == [claimed.id]


def test_change_stream_ignores_other_queues_routes_and_targets(mongo_replset: Any, opened: Any,
                                                               queue_name: str) -> None:
    waiter = opened(queue_name, mongo_replset.url)
    elsewhere = opened("another-queue", mongo_replset.url)
    same = opened(queue_name, mongo_replset.url)

    written: list[float] = []

    def noise() -> None:
        elsewhere.enqueue([make_record("another-queue")])
        same.enqueue([make_record(queue_name, "other-route"), make_record(queue_name, target="not-me")])
        written.append(time.monotonic())

    timer = threading.Timer(0.2, noise)
    started = time.monotonic()
    timer.start()
    waiter.wait_for_work("r", "w", 1.0)
    returned = time.monotonic()
    timer.join(5)
    assert 0.95 < returned - started < 1.5
    # The noise really landed while the waiter waited: else the test proves nothing.
    assert written and written[0] < returned
    assert len(elsewhere.claim("r", "x", 10)) == 1 and len(same.claim("other-route", "x", 10)) == 1
    assert waiter.claim("r", "w", 10) == [] and len(same.claim("r", "not-me", 10)) == 1


def test_waiter_wakes_when_a_scheduled_record_falls_due(mongo: Any, opened: Any, queue_name: str) -> None:
    store = opened(queue_name, mongo.url)
    store.enqueue([make_record(queue_name, due=time.time() + 0.5)])
    started = time.monotonic()
    store.wait_for_work("r", "w", 5.0)
    assert 0.4 < time.monotonic() - started < 0.8
    assert len(store.claim("r", "w", 10)) == 1


def test_standalone_wait_polls_and_returns_when_work_appears(mongo_standalone: Any, opened: Any,
                                                             queue_name: str) -> None:
    waiter, producer = opened(queue_name, mongo_standalone.url), opened(queue_name, mongo_standalone.url)
    timer = threading.Timer(0.3, lambda: producer.enqueue([make_record(queue_name)]))
    started = time.monotonic()
    timer.start()
    waiter.wait_for_work("r", "w", 5.0)
    elapsed = time.monotonic() - started
    assert 0.25 < elapsed < 0.3 + waiter.max_idle_poll + 0.1
    idle = time.monotonic()
    waiter.wait_for_work("zz", "w", 0.4)
    assert 0.38 < time.monotonic() - idle < 0.6


@pytest.mark.serial  # a pick-up latency bound: run alone, not beside other tests' pools
def test_pick_up_latency_with_a_real_worker(mongo: Any, queue_name: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Fire -> claimed, measured from the record (created vs started) with an idle ``skunq work``."""
    backend = BackendUnderTest(name="mongodb", url=mongo.url, db=DB)
    pool = PoolProcess(backend, queue_name, ["r"], log_path=tmp_path / "pool.log")
    queue = SkunkQueue(queue_name, backend="mongodb", conn_url=mongo.url, dbname=DB)
    try:
        pool.wait_ready()
        add = queue.event(routes=["r"])(jobs.add.func)
        rng = random.Random(3)
        latencies = []
        for i in range(20):
            time.sleep(rng.uniform(0.3, 0.9))  # let the worker go idle (and back off, where it polls)
            handle = add.fire(i, 1)
            assert handle.wait(timeout=20) == i + 1
            record = queue.get(handle.id)
            assert record is not None and record.started is not None
            latencies.append(record.started - record.created)
    finally:
        queue.close()
        pool.stop()
    latencies.sort()
    median, p90 = statistics.median(latencies), latencies[int(0.9 * len(latencies)) - 1]
    topology = "replica set (change stream)" if "replicaSet" in mongo.url else "standalone (polling)"
    with capsys.disabled():
        print(f"\npick-up latency, {topology}: median {median * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms, "
              f"max {latencies[-1] * 1000:.1f} ms (n={len(latencies)})")
    # The worker polls a standalone with a back-off capped at 200 ms; a change stream wakes it at once.
    assert median < (0.05 if "replicaSet" in mongo.url else 0.25)


# == Failures ===========================================================================

def test_interrupted_read_is_retried_and_logged(mongo: Any, opened: Any, queue_name: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    app = f"retry-{uuid.uuid4().hex[:6]}"
    sep = "&" if "?" in mongo.url else "/?"
    url = (mongo.url if mongo.url.startswith("mongodb://") else f"mongodb://{mongo.url}") + f"{sep}appName={app}"
    store = opened(queue_name, url)
    record = make_record(queue_name)
    store.enqueue([record])
    with mongo.client() as admin:
        # Drop the connection under the next two finds: pymongo's own retry
        # meets the second drop, so the backend's retry has to step in.
        admin.admin.command("configureFailPoint", "failCommand", mode={"times": 2},
                            data={"failCommands": ["find"], "closeConnection": True, "appName": app})
        try:
            with caplog.at_level(logging.WARNING, logger="skunkqueue.mongodb"):
                got = store.get(record.id)
        finally:
            admin.admin.command("configureFailPoint", "failCommand", mode="off")
    assert got is not None and got.id == record.id
    assert any("get was interrupted" in r.getMessage() and "retrying" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("replset", [False, True], ids=["standalone", "replset"])
def test_restart_mid_run_loses_no_acknowledged_enqueue(make_mongo: Callable[..., Any], replset: bool,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    server = make_mongo(replset=replset)
    queue = "restart"
    store = MongoPersistence(queue, url=server.url, db=DB)
    acknowledged: list[str] = []
    refused: list[str] = []
    slowest = [0.0]
    stop = threading.Event()

    def produce() -> None:
        while not stop.is_set():
            record = make_record(queue)
            started = time.monotonic()
            try:
                store.enqueue([record])
            except BackendUnavailable as exc:
                refused.append(str(exc))
                time.sleep(0.05)
                continue
            slowest[0] = max(slowest[0], time.monotonic() - started)
            acknowledged.append(record.id)
            time.sleep(0.002)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        wait_until(lambda: len(acknowledged) >= 100, what="enqueues before the restart")
        server.stop()
        time.sleep(1.0)
        server.start()
        after = len(acknowledged)
        wait_until(lambda: len(acknowledged) >= after + 100, timeout=30, what="enqueues after the restart")
    finally:
        stop.set()
        producer.join(30)
    # The outage was felt: an enqueue either waited for the server or was refused.
    assert refused or slowest[0] > 0.5
    stored = {doc["_id"] for doc in store.jobs.find({"queue": queue}, {"_id": 1})}
    missing = [job_id for job_id in acknowledged if job_id not in stored]
    assert missing == [], f"{len(missing)} acknowledged enqueues were lost"
    # The same instance carries on, reconnected by pymongo.
    assert len(store.claim("r", "w", 10, limit=5)) == 5
    store.close()


# == A kill request is never lost ===========================================================


@pytest.mark.parametrize("via", KILL_ROUTES_BACK)
def test_a_killed_record_expires_after_result_ttl(mongo_standalone: Any, opened: Any, queue_name: str,
                                                  via: str) -> None:
    """The kit checks the killed record's fields (kill_then_hand_back); here: its TTL index date."""
    store = opened(queue_name, mongo_standalone.url, result_ttl=300)
    _, final = kill_then_hand_back(store, queue_name, via)
    assert final.state == KILLED and final.finished is not None
    expire_at = store.jobs.find_one({"_id": final.id})["expire_at"].replace(tzinfo=timezone.utc)
    assert abs(expire_at.timestamp() - (final.finished + 300)) < 0.01


# == The server's clock ====================================================================

@pytest.mark.parametrize("skew", clockskew.SKEWS)
def test_protocol_times_come_from_the_server_clock(mongo: Any, opened: Any, queue_name: str, skew: float) -> None:
    clockskew.check_protocol_uses_the_store_clock(opened(queue_name, mongo.url), skew)


@pytest.mark.parametrize("skew", clockskew.SKEWS)
def test_a_skewed_worker_steals_no_live_lease(mongo_replset: Any, queue_name: str, skew: float,
                                              tmp_path: Path) -> None:
    backend = BackendUnderTest(name="mongodb", url=mongo_replset.url, db=DB)
    clockskew.check_skewed_worker_steals_no_live_lease(backend, queue_name, skew, tmp_path)


@pytest.mark.parametrize("skew", clockskew.SKEWS)
def test_a_skewed_worker_runs_a_delayed_job_on_time(mongo: Any, queue_name: str, skew: float,
                                                    tmp_path: Path) -> None:
    backend = BackendUnderTest(name="mongodb", url=mongo.url, db=DB)
    clockskew.check_skewed_worker_runs_delayed_job_on_time(backend, queue_name, skew, tmp_path)


# == A dropped database gets its indexes back ================================================


def test_housekeeping_recreates_indexes_after_drop_database(mongo_standalone: Any, queue_name: str,
                                                          tmp_path: Path) -> None:
    db = f"drop_{uuid.uuid4().hex[:8]}"
    backend = BackendUnderTest(name="mongodb", url=mongo_standalone.url, db=db)
    pool = PoolProcess(backend, queue_name, ["r"], log_path=tmp_path / "pool.log")
    queue = SkunkQueue(queue_name, backend="mongodb", conn_url=mongo_standalone.url, dbname=db, result_ttl=1)
    client = MongoClient(mongo_standalone.url)
    try:
        pool.wait_ready()
        add = queue.event(routes=["r"])(jobs.add.func)
        assert add.fire(1, 1).wait(timeout=20) == 2
        assert {"claim_priority", "lease", "expire"} <= set(client[db]["jobs"].index_information())
        client.drop_database(db)
        assert set(client[db]["jobs"].index_information()) <= {"_id_"}
        # Jobs keep flowing, and the worker's housekeeping puts the indexes back.
        handles = [add.fire(i, 1) for i in range(5)]
        assert [h.wait(timeout=20) for h in handles] == [i + 1 for i in range(5)]
        wait_until(lambda: {"claim_priority", "lease", "expire", "key", "flow_slot"}
                   <= set(client[db]["jobs"].index_information())
                   and "queue" in client[db]["workers"].index_information()
                   and "stats_expire" in client[db]["stats"].index_information(),
                   timeout=mongo_persistence.INDEX_CHECK_EVERY + 10, what="the indexes to be re-created")
        assert client[db]["jobs"].index_information()["expire"]["expireAfterSeconds"] == 0
        assert "were missing; re-creating them" in pool.log()
    finally:
        client.close()
        queue.close()
        pool.stop()


# == Names ==================================================================================


@pytest.mark.parametrize(("name", "needle"), [
    ("x" * (mongo_persistence.MAX_NAME_BYTES + 1), "bytes long"),
    ("bad\udcffname", "not valid Unicode"),
])
def test_names_mongodb_cannot_hold_are_refused_when_opened(mongo_standalone: Any, name: str,
                                                           needle: str) -> None:
    for queue, routes in ((name, []), ("fine", [name])):
        with pytest.raises(ConfigurationError) as info:
            MongoPersistence.check_names(queue, routes)
        assert needle in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigurationError, match=needle):
        open_backend(name, "mongodb", url=mongo_standalone.url, db=DB)
    # A name at the limit is stored and read back.
    longest = "é" * (mongo_persistence.MAX_NAME_BYTES // 2)
    with MongoPersistence(longest, url=mongo_standalone.url, db=DB) as store:
        record = make_record(longest, route=longest)
        store.enqueue([record])
        got = store.get(record.id)
        assert got is not None and (got.queue, got.route) == (longest, longest)


# == An enqueue sent again ================================================================

@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_batch_that_sends_a_stored_record_again_stores_the_others(mongo: Any, opened: Any, queue_name: str,
                                                                    api: str) -> None:
    """insert_many refuses a stored ``_id`` (a record sent again after a lost reply, maybe running now)
    with a duplicate-key error. That is no error of the producer's, and the batch is unordered: the
    documents before and after it are stored all the same, new keys taken and held keys answered."""
    import asyncio

    store = opened(queue_name, mongo.url)
    running, held = make_record(queue_name), make_record(queue_name, key="held")
    store.enqueue_keyed([running, held])
    claimed = {r.id: r for r in store.claim("r", "w1", 30, limit=2)}
    assert sorted(claimed) == sorted([running.id, held.id])
    fresh = [make_record(queue_name) for _ in range(4)]
    keyed, wants_held = make_record(queue_name, key="new"), make_record(queue_name, key="held")
    batch = [running, fresh[0], keyed, held, fresh[1], wants_held, running, fresh[2], fresh[3]]
    holders = store.enqueue_keyed(batch) if api == "sync" else asyncio.run(store.aenqueue_keyed(batch))
    assert holders == [running.id, fresh[0].id, keyed.id, held.id, fresh[1].id, held.id, running.id,
                       fresh[2].id, fresh[3].id]
    for record in (running, held):
        stored = store.get(record.id)
        assert stored is not None and (stored.state, stored.owner, stored.token) == (RUNNING, "w1", 1)
    assert store.get(wants_held.id) is None
    assert sorted(r.id for r in store.claim("r", "w2", 30, limit=10)) == sorted(r.id for r in [*fresh, keyed])
    assert store.counts() == {("r", RUNNING): 7}


@pytest.mark.parametrize("sent_before", [True, False])
def test_a_step_sent_again_whose_insert_is_tried_twice_still_runs(mongo: Any, opened: Any,
                                                                   queue_name: str, sent_before: bool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A resend (the producer's) whose own insert_many loses its reply and is tried again by _call:
    the step stored and attached by the earlier send must not be attached anew (it waited for ever),
    and a step whose only send is this one must still be attached."""
    from pymongo.errors import AutoReconnect

    from skunkqueue import dependencies

    store = opened(queue_name, mongo.url)
    a, b = make_record(queue_name), make_record(queue_name)
    c = make_record(queue_name, parents=[a.id, b.id], due=dependencies.WAITING_DUE)
    store.enqueue([a, b, c] if sent_before else [a, b])
    held = {r.id: r for r in store.claim("r", "w", 30, limit=5)}
    assert sorted(held) == sorted([a.id, b.id])
    assert store.finish(a.id, held[a.id].token, policy.completed(b"a"))
    real = store.jobs.insert_many
    lost: list[int] = []

    def reply_lost(*args: Any, **kwargs: Any) -> Any:
        if not lost:
            lost.append(1)
            try:
                real(*args, **kwargs)
            finally:
                raise AutoReconnect("connection closed (injected: the reply was lost)")
        return real(*args, **kwargs)

    monkeypatch.setattr(store.jobs, "insert_many", reply_lost)
    fresh = make_record(queue_name)
    store.enqueue([c, fresh])
    monkeypatch.undo()
    assert lost
    assert store.finish(b.id, held[b.id].token, policy.completed(b"b"))
    assert sorted(r.id for r in store.claim("r", "w", 30, limit=5)) == sorted([c.id, fresh.id]), \
        "the step was not released when its last parent finished"


@pytest.mark.parametrize("order", ["claimed after the snapshot", "stored after the snapshot"])
def test_a_resend_in_an_application_transaction_that_conflicts(mongo_replset: Any, opened: Any, queue_name: str,
                                                               order: str) -> None:
    """The application runs its transaction again (``using=``), firing the same record, while the
    record changes under it: a worker claims it, or the producer's first send lands, after the
    transaction's snapshot. Either the transaction commits leaving the record as the worker or the
    first send has it, or it fails with an error ``with_transaction`` retries -- never a duplicate
    _id, never the record stored twice or made pending again."""
    from pymongo.errors import PyMongoError

    store = opened(queue_name, mongo_replset.url)
    record = make_record(queue_name)
    if order == "claimed after the snapshot":
        store.enqueue([record])
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_replset.url, serverSelectionTimeoutMS=10000)
    try:
        client["app"]["rows"].insert_one({"scope": queue_name, "tag": "outside"})
        attempts: list[str] = []

        def body(session: Any) -> None:
            client["app"]["rows"].insert_one({"scope": queue_name, "tag": "in"}, session=session)  # the snapshot
            if not attempts:
                if order == "claimed after the snapshot":
                    assert [r.id for r in store.claim("r", "w1", 30)] == [record.id]
                else:
                    store.enqueue([record])
            attempts.append("try")
            assert store.enqueue_in(session, [record]) == [record.id]

        with client.start_session() as session:
            try:
                session.with_transaction(body)
            except PyMongoError as exc:  # pragma: no cover - what the test is here to catch
                pytest.fail(f"the resend's conflict was not retried by with_transaction: {exc!r} "
                            f"(labels {getattr(exc, '_error_labels', None)})")
        got = store.get(record.id)
        assert got is not None
        if order == "claimed after the snapshot":
            assert (got.state, got.owner, got.token) == (RUNNING, "w1", 1)
            assert store.claim("r", "w2", 30) == []
        else:
            assert (got.state, got.token) == (PENDING, 0)
            assert [r.id for r in store.claim("r", "w2", 30, limit=5)] == [record.id]
        assert store.counts() == {("r", RUNNING): 1}
        assert client["app"]["rows"].count_documents({"scope": queue_name, "tag": "in"}) == 1
    finally:
        client.close()
