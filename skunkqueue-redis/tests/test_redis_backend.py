"""What the conformance kit cannot see: addresses, secrets, expiry, round trips, atomicity, layout."""

from __future__ import annotations

import logging
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import clockskew
import pytest
import redis
from redis.connection import SSLConnection, UnixDomainSocketConnection

from skunkqueue import Job, SkunkQueue, policy
from skunkqueue.backends import open_backend
from skunkqueue.errors import BackendUnavailable, ConfigurationError, MalformedRecord
from skunkqueue.persistence import Persistence
from skunkqueue.record import COMPLETE, ERROR, KILLED, PENDING, RUNNING, Outcome, WorkerInfo
from skunkqueue.testing import BackendUnderTest, jobs
from skunkqueue.testing.suite_fields import KILL_ROUTES_BACK, kill_then_hand_back
from skunkqueue.testing.suite_support import make_record
from skunkqueue_redis.connection import parse_conn_url
from skunkqueue_redis.persistence import RedisPersistence

SECRET = "s3cr3t-Pa55:w@rd"
QUOTED_SECRET = "s3cr3t-Pa55%3Aw%40rd"


record = make_record


@pytest.fixture
def store(url: str, queue_name: str) -> Iterator[RedisPersistence]:
    backend = open_backend(queue_name, "redis", url=url, db="5")
    assert isinstance(backend, RedisPersistence)
    yield backend
    backend.close()


# == addresses ===============================================================================


def test_host_port_defaults_and_db_override() -> None:
    spec = parse_conn_url("example.org:6380", "4")
    assert not spec.cluster
    assert (spec.kwargs["host"], spec.kwargs["port"], spec.kwargs["db"]) == ("example.org", 6380, 4)
    default = parse_conn_url(None, None)
    assert (default.kwargs["host"], default.kwargs["port"]) == ("localhost", 6379)
    # --db wins over a number in the URL's path, since workers only get --url and --db.
    assert parse_conn_url("redis://h:1/2", "7").kwargs["db"] == 7
    assert parse_conn_url("redis://h:1/2", None).kwargs["db"] == 2


def test_user_password_tls_and_unix_urls() -> None:
    spec = parse_conn_url(f"redis://alice:{QUOTED_SECRET}@db.internal:6390", "0")
    assert (spec.kwargs["username"], spec.kwargs["password"]) == ("alice", SECRET)
    tls = parse_conn_url("rediss://:pw@secure.example:6379?ssl_cert_reqs=none", None)
    assert tls.kwargs["connection_class"] is SSLConnection and tls.kwargs["ssl_cert_reqs"] == "none"
    sock = parse_conn_url("unix:///run/redis/redis.sock", "2")
    assert sock.kwargs["connection_class"] is UnixDomainSocketConnection
    assert (sock.kwargs["path"], sock.kwargs["db"]) == ("/run/redis/redis.sock", 2)


def test_cluster_urls() -> None:
    spec = parse_conn_url(f"redis+cluster://bob:{QUOTED_SECRET}@10.0.0.1:7000,10.0.0.2:7001", "0")
    assert spec.cluster and spec.nodes == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    assert (spec.kwargs["username"], spec.kwargs["password"]) == ("bob", SECRET)
    assert "host" not in spec.kwargs and "db" not in spec.kwargs
    tls = parse_conn_url("rediss+cluster://10.0.0.1:7000", None)
    assert tls.cluster and tls.kwargs["ssl"] is True


@pytest.mark.parametrize("url, db, needle", [
    ("mongodb://h:1", None, "unknown scheme"),
    ("redis://h:1", "first", "not a number"),
    ("redis+cluster://h:7000", "3", "only database 0"),
    ("redis+cluster://h", None, "host:port"),
])
def test_bad_addresses_say_what_is_wrong(url: str, db: str | None, needle: str) -> None:
    with pytest.raises(ConfigurationError, match=needle):
        parse_conn_url(url, db)


def test_unix_socket_connects(redis_server: Any, queue_name: str) -> None:
    with RedisPersistence(queue_name, url=f"unix://{redis_server.unix_socket}", db="1") as store:
        job = record(queue_name)
        store.enqueue([job])
        got = store.get(job.id)
        assert got is not None and got.id == job.id
    assert redis.Redis(port=redis_server.port, db=1).exists(f"sq:{{{queue_name}}}:j:{job.id}") == 1


def test_tls_server_via_rediss_url(tmp_path: Path, start_redis: Callable[..., Any], free_port: int,
                                   queue_name: str) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server = start_redis(extra=["--tls-port", str(free_port), "--tls-cert-file", str(cert),
                                "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
                                "--tls-auth-clients", "no"])
    with RedisPersistence(queue_name, url=f"rediss://127.0.0.1:{free_port}?ssl_ca_certs={cert}"
                                          "&ssl_check_hostname=false", db="0") as store:
        job = record(queue_name)
        store.enqueue([job])
        [claimed] = store.claim("r", "w", 10)
        assert claimed.id == job.id
    # The same data is visible over the plain port: it really went to this server.
    assert redis.Redis(port=server.port).hget(f"sq:{{{queue_name}}}:j:{job.id}", "state") == b"running"


# == secrets and failures ======================================================================


def test_password_protected_server_works_via_url(start_redis: Callable[..., Any], queue_name: str) -> None:
    server = start_redis(password=SECRET)
    url = f"redis://default:{QUOTED_SECRET}@127.0.0.1:{server.port}"
    with open_backend(queue_name, "redis", url=url, db="0") as store:
        job = record(queue_name)
        store.enqueue([job])
        [claimed] = store.claim("r", "w", 10)
        assert store.finish(claimed.id, claimed.token, policy.completed(b"ok"))
        done = store.get(job.id)
        assert done is not None and done.result == b"ok"


@pytest.mark.parametrize("userinfo", [f"default:{QUOTED_SECRET}-wrong", ""])
def test_refused_credentials_never_show_the_password(start_redis: Callable[..., Any], queue_name: str,
                                                     userinfo: str) -> None:
    server = start_redis(password=SECRET)
    url = f"redis://{userinfo}{'@' if userinfo else ''}127.0.0.1:{server.port}"
    with pytest.raises(ConfigurationError) as info:
        RedisPersistence(queue_name, url=url, db="0")
    message = str(info.value)
    assert f"127.0.0.1:{server.port}" in message
    assert SECRET not in message and QUOTED_SECRET not in message and "wrong" not in message


def test_unreachable_server_fails_fast_with_a_redacted_address(free_port: int, queue_name: str) -> None:
    url = f"redis://admin:{QUOTED_SECRET}@127.0.0.1:{free_port}"
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as info:
        open_backend(queue_name, "redis", url=url, db="0")
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert f"redis://admin:***@127.0.0.1:{free_port}" in message
    assert SECRET not in message and QUOTED_SECRET not in message and "Pa55" not in message


def test_server_going_away_is_backend_unavailable(start_redis: Callable[..., Any], queue_name: str) -> None:
    server = start_redis()
    store = RedisPersistence(queue_name, url=f"127.0.0.1:{server.port}", retries=1)
    store.enqueue([record(queue_name)])
    server.kill()
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=f"127.0.0.1:{server.port}"):
        store.claim("r", "w", 10)
    assert time.monotonic() - started < 5


def test_unreachable_cluster_is_backend_unavailable(free_port: int, queue_name: str) -> None:
    with pytest.raises(BackendUnavailable, match=f"redis\\+cluster://u:\\*\\*\\*@127.0.0.1:{free_port}"):
        RedisPersistence(queue_name, url=f"redis+cluster://u:{QUOTED_SECRET}@127.0.0.1:{free_port}")


# == records ==================================================================================


def test_records_round_trip_exactly(store: RedisPersistence, queue_name: str) -> None:
    every_byte = bytes(range(256))
    full = record(queue_name, "route:with%odd:chars", payload=every_byte, serializer="pickle",
                  due=1700000000.123456789, timeout=2.5, retries=3, retry_backoff=0.25, target="w:1",
                  error={"type": "ValueError", "message": "ünïcödé \x00 quote\"", "traceback": "tb"},
                  kill_requested=True, dead=True, attempts=7, token=9)
    empty = record(queue_name, payload=b"", result=None, error=None, target=None)
    store.enqueue([full, empty])
    for original in (full, empty):
        got = store.get(original.id)
        assert got is not None and got.to_dict() == original.to_dict()
    assert store.get(empty.id).timeout is None  # type: ignore[union-attr]
    [claimed] = store.claim("r", "w", 10)
    assert store.finish(claimed.id, claimed.token, policy.completed(b""))
    done = store.get(empty.id)
    assert done is not None and done.result == b"" and done.error is None and done.owner is None


def test_an_enqueue_sent_again_leaves_a_claimed_record_alone(store: RedisPersistence, queue_name: str) -> None:
    """A producer whose enqueue lost its reply (the connection reset after Redis ran it) sends the
    batch again, and an idle worker's claim, riding on its wake-up, may already have taken the record.
    Stored again, it was pending and claimable: a chaos run saw two workers run it at once."""
    record, other = make_record(queue_name), make_record(queue_name)
    store.enqueue([record])
    [claimed] = store.claim("r", "w1", lease=10)
    store.enqueue([record, other])
    stored = store.get(record.id)
    assert stored is not None and (stored.state, stored.token, stored.owner) == (RUNNING, claimed.token, "w1")
    assert [r.id for r in store.claim("r", "w2", lease=10, limit=5)] == [other.id]
    assert store.finish(record.id, claimed.token, policy.completed(b"1"))


def test_claim_is_fifo_with_limit_and_merges_broadcasts(store: RedisPersistence, queue_name: str) -> None:
    base = time.time() - 100
    jobs = [record(queue_name, due=base + i, target="w1" if i % 3 == 0 else None) for i in range(30)]
    store.enqueue(jobs[::-1])
    order = []
    while batch := store.claim("r", "w1", 10, limit=4):
        order += [r.id for r in batch]
    assert order == [j.id for j in jobs]


def test_undecodable_record_is_quarantined_not_returned(store: RedisPersistence, raw: redis.Redis,
                                                        queue_name: str) -> None:
    bad, good = record(queue_name, due=time.time() - 2), record(queue_name, due=time.time() - 1)
    store.enqueue([bad, good])
    raw.hset(f"sq:{{{queue_name}}}:j:{bad.id}", "retry_backoff", "not-a-float")
    claimed = store.claim("r", "w", 10, limit=5)
    assert [r.id for r in claimed] == [good.id]
    flat = raw.hgetall(f"sq:{{{queue_name}}}:j:{bad.id}")
    assert flat[b"state"] == b"error" and flat[b"dead"] == b"1" and b"not-a-float" in flat[b"error"]
    assert raw.ttl(f"sq:{{{queue_name}}}:j:{bad.id}") > 0
    assert raw.zscore(f"sq:{{{queue_name}}}:lease", bad.id) is None
    with pytest.raises(MalformedRecord):
        store.get(bad.id)
    assert store.claim("r", "w", 10) == []


# == expiry ====================================================================================


def test_finished_records_expire_after_result_ttl(url: str, raw: redis.Redis, queue_name: str) -> None:
    with RedisPersistence(queue_name, url=url, db="5", result_ttl=1.0) as store:
        job, keep = record(queue_name), record(queue_name, due=time.time() + 60)
        store.enqueue([job, keep])
        [claimed] = store.claim("r", "w", 10)
        key = f"sq:{{{queue_name}}}:j:{job.id}"
        assert raw.pttl(key) == -1  # running records never expire
        assert store.finish(job.id, claimed.token, policy.completed(b"1"))
        assert 0 < raw.pttl(key) <= 1000
        assert raw.ttl(f"sq:{{{queue_name}}}:j:{keep.id}") == -1
        time.sleep(1.2)
        assert store.get(job.id) is None
        store.expired_leases(time.time())  # housekeeping drops the index entry too
        assert raw.zscore(f"sq:{{{queue_name}}}:jobs", job.id) is None
        assert store.counts() == {("r", PENDING): 1}


def test_retrying_a_finished_record_cancels_its_expiry(url: str, raw: redis.Redis, queue_name: str) -> None:
    with RedisPersistence(queue_name, url=url, db="5", result_ttl=30) as store:
        job = record(queue_name)
        store.enqueue([job])
        [claimed] = store.claim("r", "w", 10)
        store.finish(job.id, claimed.token, policy.failed(claimed, {"type": "E", "message": "m",
                                                                    "traceback": ""}))
        key = f"sq:{{{queue_name}}}:j:{job.id}"
        assert raw.ttl(key) > 0
        failed = store.get(job.id)
        assert failed is not None and failed.state == ERROR
        assert store.finish(job.id, failed.token, policy.requeue(failed), expect=ERROR)
        assert raw.ttl(key) == -1
        assert raw.exists(f"sq:{{{queue_name}}}:done:{job.id}") == 0
        [again] = store.claim("r", "w", 10)
        assert (again.id, again.attempts) == (job.id, 1)


# == round trips and blocking ====================================================================


def _commandstats(client: redis.Redis) -> dict[str, int]:
    return {name: stats["calls"] for name, stats in client.info("commandstats").items()}


@pytest.fixture
def round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts requests written to any Redis connection (a pipeline is one write)."""
    sent = [0]
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sent[0] += 1
        original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    return sent


def test_claim_and_finish_are_one_round_trip_each(store: RedisPersistence, queue_name: str,
                                                  round_trips: list[int]) -> None:
    store.enqueue([record(queue_name) for _ in range(10)])
    store.claim("r", "warmup", 10)  # loads the scripts (EVALSHA falls back to EVAL once)
    store.finish("nothing", 1, policy.completed(b""))
    round_trips[0] = 0
    batch = store.claim("r", "w", 10, limit=5)
    assert len(batch) == 5 and round_trips[0] == 1
    for claimed in batch:
        assert store.finish(claimed.id, claimed.token, policy.completed(b"1"))
    assert round_trips[0] == 6
    round_trips[0] = 0
    store.enqueue([record(queue_name, f"route{i % 3}") for i in range(1000)])
    assert round_trips[0] == 1


def test_script_calls_survive_a_flushed_script_cache(store: RedisPersistence, raw: redis.Redis,
                                                    queue_name: str) -> None:
    # Scripts run on the store's own connection (HotLine), beside redis-py's pool: a server that
    # lost its scripts (restart, SCRIPT FLUSH) must get them again there too.
    store.enqueue([record(queue_name)])
    raw.script_flush()
    assert len(store.claim("r", "w", 10)) == 1
    store.enqueue([record(queue_name)])
    assert len(store.claim("r", "w", 10)) == 1


def test_a_dropped_script_connection_is_replaced_and_nothing_runs_twice(store: RedisPersistence,
                                                                         raw: redis.Redis,
                                                                         queue_name: str) -> None:
    store.enqueue([record(queue_name) for _ in range(3)])
    assert len(store.claim("r", "w", 10, limit=1)) == 1
    # The server drops every connection but this one (a restart, an idle timeout, a proxy).
    raw.client_kill_filter(_type="normal", skipme=True)
    assert len(store.claim("r", "w", 10, limit=1)) == 1   # no error: the call was made again
    assert len(store.claim("r", "w", 10, limit=1)) == 1
    fields = [raw.hmget(f"sq:{{{queue_name}}}:j:{job_id.decode()}", "state", "attempts")
              for job_id in raw.zrange(f"sq:{{{queue_name}}}:jobs", 0, -1)]
    assert fields == [[b"running", b"1"]] * 3  # each claimed once: no claim ran twice


def test_threads_and_a_forked_child_share_a_store_safely(store: RedisPersistence, queue_name: str) -> None:
    store.enqueue([record(queue_name)])  # the parent's script connection is open from here on
    pid = os.fork()
    if pid == 0:  # the child must open its own connection, not write into the parent's
        try:
            store.enqueue([record(queue_name) for _ in range(50)])
            os._exit(0)
        except BaseException:
            os._exit(1)

    def fire() -> None:
        for _ in range(50):
            store.enqueue([record(queue_name)])

    threads = [threading.Thread(target=fire) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    claimed = store.claim("r", "w", 10, limit=1000)
    assert len(claimed) == len({c.id for c in claimed}) == 1 + 50 + 8 * 50


def test_wait_on_a_finished_job_reads_it_once(url: str, queue_name: str, round_trips: list[int]) -> None:
    queue = SkunkQueue(queue_name, backend="redis", conn_url=url, dbname="5")
    try:
        add = Job(queue, jobs.add.func, ["r"])
        handle = add.fire(1, 2)
        [claimed] = queue.persistence.claim("r", "w", 10)
        queue.persistence.finish(claimed.id, claimed.token, policy.completed(b"3"))
        round_trips[0] = 0
        assert handle.wait(timeout=5) == 3
        assert round_trips[0] == 1  # the finished record already holds the result: no second read
    finally:
        queue.close()


@pytest.fixture
def sent_by(monkeypatch: pytest.MonkeyPatch) -> dict[int, int]:
    """Requests written to any Redis connection (a pipeline is one write), by thread id."""
    sent: dict[int, int] = {}
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sent[threading.get_ident()] = sent.get(threading.get_ident(), 0) + 1
        original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    return sent


class _Counted(threading.Thread):
    """A thread that runs ``target`` and keeps its return value."""

    def __init__(self, target: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.call, self.value = target, None

    def run(self) -> None:
        self.value = self.call()

    def until_blocked(self, raw: redis.Redis) -> None:
        deadline = time.monotonic() + 10
        while not int(raw.info("clients")["blocked_clients"]):
            assert time.monotonic() < deadline, "the waiter never blocked on the server"
            time.sleep(0.005)


def test_a_wait_reads_the_record_in_the_round_trip_that_hears_the_finish(
        url: str, raw: redis.Redis, queue_name: str, sent_by: dict[int, int]) -> None:
    # Issue 28's latency path: the BLMOVE on the done list and the HGETALL go in one write, so the
    # waiter's look after the finish costs no round trip of its own (one to look, one to wait-and-read).
    queue = SkunkQueue(queue_name, backend="redis", conn_url=url, dbname="5")
    try:
        add = Job(queue, jobs.add.func, ["r"])
        handle = add.fire(1, 2)
        [claimed] = queue.persistence.claim("r", "w", 10)

        def wait() -> tuple[Any, int]:
            queue.persistence.wait_finished(claimed.id, 0.05)  # connects (not counted)
            before = sent_by[threading.get_ident()]
            return handle.wait(timeout=20), sent_by[threading.get_ident()] - before

        waiter = _Counted(wait)
        waiter.start()
        time.sleep(0.1)
        waiter.until_blocked(raw)
        queue.persistence.finish(claimed.id, claimed.token, policy.completed(b"3"))
        waiter.join(20)
        assert waiter.value == (3, 2)  # the first look, then the wait and the read together
    finally:
        queue.close()


def test_a_wait_that_times_out_returns_the_unfinished_record(store: RedisPersistence, queue_name: str) -> None:
    job = record(queue_name)
    store.enqueue([job])
    started = time.monotonic()
    found = store.wait_finished(job.id, 0.3)
    assert found is not None and found.state == PENDING
    assert 0.25 < time.monotonic() - started < 3


def test_a_wait_on_something_else_than_a_record_says_so(store: RedisPersistence, raw: redis.Redis,
                                                        queue_name: str) -> None:
    job = record(queue_name)
    store.enqueue([job])
    key = f"sq:{{{queue_name}}}:j:{job.id}"
    threading.Timer(0.2, lambda: (raw.delete(key), raw.set(key, "not a hash"),
                                  raw.rpush(f"sq:{{{queue_name}}}:done:{job.id}", "1"))).start()
    with pytest.raises(MalformedRecord):
        store.wait_finished(job.id, 5)
    job2 = record(queue_name)  # the connection is still in step afterwards
    store.enqueue([job2])
    assert store.get(job2.id) is not None


def test_an_idle_worker_claims_in_the_round_trip_that_wakes_it(store: RedisPersistence, url: str, raw: redis.Redis,
                                                               queue_name: str, sent_by: dict[int, int]) -> None:
    assert store.claims_on_wake
    assert store.wait_and_claim("r", "w", 0.01, 0.0, 10) == []
    store.client.ping()  # the pool's connection, which the waiter takes next, is made (not counted)
    waiter = _Counted(lambda: store.wait_and_claim("r", "w", 5.0, 0.0, 10))
    waiter.start()
    waiter.until_blocked(raw)
    job = record(queue_name)
    with RedisPersistence(queue_name, url=url, db="5") as producer:
        producer.enqueue([job])
    waiter.join(10)
    [claimed] = waiter.value or [None]
    assert claimed is not None and claimed.id == job.id and claimed.state == RUNNING and claimed.token
    assert sent_by[waiter.ident or 0] == 1  # the claim rode on the wake-up
    fields = raw.hmget(f"sq:{{{queue_name}}}:j:{job.id}", "state", "owner", "attempts")
    assert fields == [b"running", b"w", b"1"]


def test_a_claim_on_wake_runs_when_the_wait_times_out_and_after_a_script_flush(
        store: RedisPersistence, raw: redis.Redis, queue_name: str) -> None:
    started = time.monotonic()
    assert store.wait_and_claim("r", "w", 0.2, 0.0, 10) == []
    assert 0.15 < time.monotonic() - started < 3
    job = record(queue_name, due=time.time() + 0.3)  # falls due while the worker waits: no wake-up token
    store.enqueue([job])
    raw.script_flush()  # the claim after the wait finds no script: it is loaded and run, once
    assert store.claim("r", "w", 10) == []
    [claimed] = store.wait_and_claim("r", "w", 3.0, 0.0, 10)
    assert claimed.id == job.id
    assert raw.hget(f"sq:{{{queue_name}}}:j:{job.id}", "attempts") == b"1"


def test_hot_paths_never_scan_the_keyspace(store: RedisPersistence, raw: redis.Redis, queue_name: str) -> None:
    raw.config_resetstat()
    store.enqueue([record(queue_name, f"route{i % 3}") for i in range(300)])
    while batch := store.claim("route1", "w", 10, limit=50):
        for claimed in batch:
            store.finish(claimed.id, claimed.token, policy.completed(b"1"))
    store.expired_leases(time.time())
    store.wait_for_work("route1", "w", 0.01)
    store.counts()
    store.list_jobs(route="route1")
    store.purge("route2")
    stats = _commandstats(raw)
    assert stats["cmdstat_evalsha"] >= 100
    assert not {"cmdstat_keys", "cmdstat_scan"} & set(stats)


def test_counts_read_no_record(store: RedisPersistence, raw: redis.Redis, queue_name: str) -> None:
    # counts() answers from the per-route index: its cost does not grow with the number of records.
    store.enqueue([record(queue_name, f"route{i % 3}") for i in range(300)])
    [claimed] = store.claim("route1", "w", 10)
    store.finish(claimed.id, claimed.token, policy.completed(b"1"))
    store.counts()  # the first look at a queue builds the index once for records older than it
    raw.config_resetstat()
    assert store.counts() == {("route0", PENDING): 100, ("route1", PENDING): 99, ("route1", COMPLETE): 1,
                              ("route2", PENDING): 100}
    calls = _commandstats(raw)
    assert not {name for name in calls if name.startswith("cmdstat_h")}, calls  # no HGET, HMGET, HGETALL
    assert sum(calls.values()) < 40, calls


def test_idle_worker_wakes_within_milliseconds(store: RedisPersistence, url: str, queue_name: str) -> None:
    delays = []
    with RedisPersistence(queue_name, url=url, db="5") as producer:
        for _ in range(10):
            assert store.claim("r", "w", 10) == []
            woke: list[float] = []

            def wait(woke: list[float] = woke) -> None:
                store.wait_for_work("r", "w", 3.0)
                woke.append(time.perf_counter())

            waiter = threading.Thread(target=wait)
            waiter.start()
            time.sleep(0.05)  # let it block on the server
            producer.enqueue([record(queue_name)])
            sent = time.perf_counter()
            waiter.join(5)
            delays.append(woke[0] - sent)
            assert len(store.claim("r", "w", 10)) == 1
    # Measured well under 1 ms on a quiet machine; a loaded CI box gets some slack.
    assert statistics.median(delays) < 0.005, delays


def test_wait_for_work_wakes_when_a_future_record_falls_due(store: RedisPersistence, queue_name: str) -> None:
    job = record(queue_name, due=time.time() + 0.4)
    store.enqueue([job])
    assert store.claim("r", "w", 10) == []
    started = time.monotonic()
    store.wait_for_work("r", "w", 3.0)
    waited = time.monotonic() - started
    assert 0.3 < waited < 0.6
    assert [r.id for r in store.claim("r", "w", 10)] == [job.id]


def test_every_waiter_wakes_when_a_job_finishes(store: RedisPersistence, url: str, queue_name: str) -> None:
    job = record(queue_name)
    store.enqueue([job])
    [claimed] = store.claim("r", "w", 10)
    results: list[tuple[str, float]] = []

    def wait() -> None:
        with RedisPersistence(queue_name, url=url, db="5") as mine:
            done = mine.wait_finished(job.id, 10)
            results.append((done.state if done else "missing", time.perf_counter()))

    waiters = [threading.Thread(target=wait) for _ in range(3)]
    for t in waiters:
        t.start()
    time.sleep(0.3)
    assert results == []
    store.finish(job.id, claimed.token, policy.completed(b"1"))
    finished = time.perf_counter()
    for t in waiters:
        t.join(10)
    assert [state for state, _ in results] == [COMPLETE] * 3
    assert max(at for _, at in results) - finished < 0.2


# == cluster layout =============================================================================


@pytest.mark.parametrize("suffix", [":odd{name}", "}x", "{", "{}", "}{", "%7D"])
def test_every_key_of_a_queue_is_in_one_cluster_slot(redis_cluster: Any, queue_name: str, suffix: str) -> None:
    # "}x" first, "{}" or "}{" alone used to leave an empty or cut-short hash tag.
    store = RedisPersistence(suffix if suffix in ("}x", "{}") else f"{queue_name}{suffix}",
                             url=redis_cluster.url, db="0")
    store.purge("a:b")
    store.purge("c")
    plain = record(store.queue, "a:b")
    broadcast = record(store.queue, "a:b", target="w%1")
    store.enqueue([plain, broadcast, record(store.queue, "c", due=time.time() + 60)])
    [first] = store.claim("a:b", "w%1", 10)
    assert first.id == plain.id
    store.finish(first.id, first.token, policy.completed(b"1"))
    store.wait_finished(first.id, 1)
    store.register_worker(WorkerInfo(id="w%1", queue=store.queue, route="a:b", host="h", pid=1))
    node = redis_cluster.nodes[0]
    client = redis.RedisCluster(host="127.0.0.1", port=node.port)
    keys = [k for k in client.keys("sq:*", target_nodes=redis.RedisCluster.ALL_NODES)
            if k.startswith(store.keys.base.encode())]
    slots = {client.cluster_keyslot(k) for k in keys}
    assert len(keys) >= 8 and len(slots) == 1, keys
    assert store.purge("a:b") == 1 and store.get(broadcast.id) is None
    store.close()
    client.close()


# == a server restart ============================================================================


def test_acknowledged_enqueues_survive_a_server_crash_and_the_backend_reconnects(
        start_redis: Callable[..., Any], queue_name: str, caplog: pytest.LogCaptureFixture) -> None:
    # appendfsync always: with everysec, Redis answers before it writes the append-only file while an
    # fsync runs late (up to 2 s, a busy disk), and a SIGKILL then loses those acknowledged jobs
    # (15 of 1,055 in one CI run); docs/guides/backends/redis.md says so.
    server = start_redis(extra=["--appendonly", "yes", "--appendfsync", "always"])
    store: Persistence = RedisPersistence(queue_name, url=f"127.0.0.1:{server.port}")
    acknowledged: list[str] = []
    refused = 0
    stop = threading.Event()

    def produce() -> None:
        nonlocal refused
        while not stop.is_set():
            batch = [record(queue_name) for _ in range(5)]
            try:
                store.enqueue(batch)
            except BackendUnavailable:
                refused += 1
                time.sleep(0.05)
                continue
            acknowledged.extend(r.id for r in batch)

    producer = threading.Thread(target=produce)
    caplog.set_level(logging.INFO, logger="skunkqueue.redis")  # reconnect attempts are noted at INFO
    producer.start()
    try:
        while len(acknowledged) < 500:
            time.sleep(0.01)
        server.kill()  # SIGKILL: no shutdown, no final fsync
        before_restart = len(acknowledged)
        time.sleep(3.0)  # longer than the backend's own retries, so some calls fail
        server.start()
        while len(acknowledged) < before_restart + 500:
            time.sleep(0.01)
    finally:
        stop.set()
        producer.join(30)
    assert refused > 0, "the producer should have seen the server gone"
    assert any("reconnecting" in r.getMessage() for r in caplog.records)
    # The same instance works again without being re-created, and nothing acknowledged was lost.
    pending = {r.id for r in store.list_jobs(state=PENDING, limit=10**6)}
    missing = [job_id for job_id in acknowledged if job_id not in pending]
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged jobs lost"
    store.close()


def test_large_batches_are_enqueued_whole_on_a_cluster(redis_cluster: Any, queue_name: str) -> None:
    # More than one script call: the calls go in one MULTI/EXEC on the queue's node.
    with RedisPersistence(queue_name, url=redis_cluster.url, db="0") as store:
        jobs = [record(queue_name, f"r{i % 2}", target="w" if i % 5 == 0 else None) for i in range(2500)]
        store.enqueue(jobs)
        assert store.counts() == {("r0", PENDING): 1250, ("r1", PENDING): 1250}
        claimed = store.claim("r0", "w", 10, limit=2000)
        assert [r.id for r in claimed] == [j.id for j in jobs if j.route == "r0"][:2000]


def test_a_never_claimed_record_can_be_killed(store: RedisPersistence, queue_name: str) -> None:
    # Token 0 is not stored (zero fields are omitted), and must still match.
    job = record(queue_name, due=time.time() + 60)
    store.enqueue([job])
    assert store.finish(job.id, 0, policy.killed("before it ran"), expect=PENDING)
    killed = store.get(job.id)
    assert killed is not None and (killed.state, killed.token) == ("killed", 0)


# == the store's clock ==========================================================================

@pytest.mark.parametrize("skew", clockskew.SKEWS)
def test_protocol_times_come_from_the_store_clock(store: RedisPersistence, skew: float) -> None:
    clockskew.check_protocol_uses_the_store_clock(store, skew)


def _kit_backend(url: str) -> BackendUnderTest:
    return BackendUnderTest(name="redis", url=url, db="5")


@pytest.mark.parametrize("skew", clockskew.SKEWS)
def test_a_skewed_worker_steals_no_live_lease(url: str, queue_name: str, skew: float, tmp_path: Path) -> None:
    clockskew.check_skewed_worker_steals_no_live_lease(_kit_backend(url), queue_name, skew, tmp_path)


@pytest.mark.parametrize("skew", clockskew.SKEWS)
def test_a_skewed_worker_runs_a_delayed_job_on_time(url: str, queue_name: str, skew: float,
                                                    tmp_path: Path) -> None:
    clockskew.check_skewed_worker_runs_delayed_job_on_time(_kit_backend(url), queue_name, skew, tmp_path)


# == a kill request is never lost ===================================================================


@pytest.mark.parametrize("via", KILL_ROUTES_BACK)
def test_a_killed_record_expires_after_result_ttl(store: RedisPersistence, raw: redis.Redis, queue_name: str,
                                                  via: str) -> None:
    """The kit checks the killed record's fields (kill_then_hand_back); here: its key's expiry."""
    _, final = kill_then_hand_back(store, queue_name, via)
    assert final.state == KILLED
    assert 0 < raw.pttl(store.keys.job(final.id)) <= store.result_ttl * 1000


# == what the server keeps across a restart ==========================================================


@pytest.mark.parametrize(("extra", "needle"), [
    ([], "keeps no durable copy"),
    (["--save", "900 1"], "keeps only RDB snapshots"),
    (["--appendonly", "yes", "--appendfsync", "no"], "appendfsync no"),
    (["--appendonly", "yes", "--appendfsync", "everysec"], None),
    (["--appendonly", "yes", "--appendfsync", "always"], None),
])
def test_durability_warnings_follow_the_server_config(start_redis: Callable[..., Any], queue_name: str,
                                                      extra: list[str], needle: str | None) -> None:
    server = start_redis(extra=extra)
    with RedisPersistence(queue_name, url=f"127.0.0.1:{server.port}") as store:
        warnings = store.durability_warnings()
    if needle is None:
        assert warnings == []
    else:
        [line] = warnings
        assert needle in line and f"127.0.0.1:{server.port}" in line and "\n" not in line


def test_durability_warnings_tolerate_an_acl_without_config(redis_server: Any, raw: redis.Redis,
                                                            queue_name: str) -> None:
    user = f"noconfig-{uuid.uuid4().hex[:6]}"
    raw.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                    commands=["+@all", "-config"])
    try:
        with RedisPersistence(queue_name, url=f"redis://{user}:pw@127.0.0.1:{redis_server.port}/5") as store:
            with pytest.raises(redis.exceptions.NoPermissionError):
                store.client.config_get("appendonly")
            assert store.durability_warnings() == []
            store.enqueue([record(queue_name)])  # and the queue works under that ACL
            assert len(store.claim("r", "w", 10)) == 1
    finally:
        raw.acl_deluser(user)


def test_durability_warnings_on_a_cluster_read_the_queues_node(redis_cluster: Any, queue_name: str) -> None:
    with RedisPersistence(queue_name, url=redis_cluster.url, db="0") as store:
        [line] = store.durability_warnings()  # the test cluster runs without persistence
        assert "keeps no durable copy" in line


def test_an_unreachable_server_is_one_clear_line_on_the_command_line(free_port: int) -> None:
    done = subprocess.run(["skunq", "status", "--backend", "redis", "--url", f"127.0.0.1:{free_port}", "-q", "x"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    assert done.returncode != 0
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "Cannot reach Redis" in lines[0], lines
    assert "reconnecting" not in done.stderr


def test_reconnect_attempts_are_logged_at_info(free_port: int, queue_name: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="skunkqueue.redis")
    with pytest.raises(BackendUnavailable):
        RedisPersistence(queue_name, url=f"127.0.0.1:{free_port}", retries=2)
    retries = [r for r in caplog.records if "reconnecting" in r.getMessage()]
    assert retries and all(r.levelno == logging.INFO for r in retries)


# == names Redis cannot hold =======================================================================


@pytest.mark.parametrize(("name", "needle"), [("bad\udcffname", "not valid Unicode"),
                                              ("x" * (1024 * 1024 + 1), "bytes long")])
def test_names_redis_cannot_hold_are_refused_when_opened(url: str, name: str, needle: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        open_backend(name, "redis", url=url, db="5")
    assert needle in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigurationError, match=needle):
        RedisPersistence.check_names("fine", [name])


def test_a_queue_stored_before_the_summary_index_is_indexed_once_on_first_summary(
        store: RedisPersistence, raw: redis.Redis) -> None:
    """Records written by a version without the tally index: summary() builds it, then the scripts keep it."""
    error = {"type": "ValueError", "message": "no", "traceback": ""}
    store.enqueue([record(store.queue, "a") for _ in range(5)] + [record(store.queue, "b", due=time.time() + 600)])
    first, second, _ = store.claim("a", "w", 30, limit=3)
    assert store.finish(first.id, first.token, policy.completed(b"1"))
    assert store.finish(second.id, second.token, Outcome(ERROR, error=error, dead=True))
    expected = {r.route: (r.states, r.dead, r.oldest_due) for r in store.summary().routes}
    # Forget the index, as a store written before it existed has none.
    k = store.keys
    # (Redis' glob treats braces literally; the queue's name is a hex uuid.)
    assert raw.delete(k.routes, k.tallied, *raw.keys(k.tally_prefix + "*")) >= 6
    assert {r.route: (r.states, r.dead, r.oldest_due) for r in store.summary().routes} == expected
    assert raw.get(k.tallied) == b"1"
    # From then on the scripts keep it: one more claim and finish show up.
    (third,) = store.claim("a", "w", 30, limit=1)
    assert store.finish(third.id, third.token, policy.completed(b"1"))
    after = {r.route: r for r in store.summary().routes}
    assert after["a"].states[COMPLETE] == 2 and after["a"].states[RUNNING] == 1 and after["a"].dead == 1
