"""What the kit does not cover: the schema's versions, the claim's index, addresses, the clock, restarts."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import clockskew
import psycopg
import pytest
from skunkqueue_postgres import schema
from skunkqueue_postgres.persistence import PostgresPersistence

from skunkqueue import policy
from skunkqueue.errors import BackendUnavailable, ConfigurationError
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import COMPLETE, PENDING, RUNNING
from skunkqueue.testing import BackendUnderTest, jobs
from skunkqueue.testing.kit import closed_port
from skunkqueue.testing.suite_support import make_record
from skunkqueue.testing.workers import PoolProcess


def _schema() -> str:
    return f"t_{uuid.uuid4().hex[:10]}"


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    return text


# -- the schema: made, upgraded, refused ------------------------------------------------


def test_a_fresh_schema_is_made_at_the_current_version(postgres: Any, opened: Callable[..., Any]) -> None:
    name = _schema()
    opened("q", postgres.url, db=name)
    with psycopg.connect(postgres.url) as conn:
        assert schema.version_of(conn, name) == schema.VERSION


def test_an_older_schema_is_upgraded_in_place_keeping_its_jobs(postgres: Any, opened: Callable[..., Any]) -> None:
    name = _schema()
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        schema.ensure(conn, name, upto=1)  # what the first release made
        assert schema.version_of(conn, name) == 1
        assert conn.execute("SELECT to_regclass(%s)", (f"{name}.stats",)).fetchone() == (None,)
        old = make_record("q")
        columns = ("queue", "id", "route", "state", "due", "func", "payload", "serializer", "created")
        conn.execute(f"INSERT INTO {name}.jobs ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))})",
                     (old.queue, old.id, old.route, old.state, old.due, old.func, old.payload, old.serializer,
                      old.created))
    store = opened("q", postgres.url, db=name)
    with psycopg.connect(postgres.url) as conn:
        assert schema.version_of(conn, name) == schema.VERSION
    [claimed] = store.claim("r", "w", 10)
    assert claimed.id == old.id and claimed.payload == old.payload
    assert store.finish(claimed.id, claimed.token, policy.completed(b"1"))
    store.add_stats([])  # the table step 2 added is there


def test_a_newer_schema_is_refused_with_one_line(postgres: Any) -> None:
    name = _schema()
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        schema.ensure(conn, name)
        conn.execute(f"UPDATE {name}.schema_version SET version = %s", (schema.VERSION + 1,))
    with pytest.raises(ConfigurationError) as caught:
        PostgresPersistence("q", url=postgres.url, db=name)
    text = _one_line(caught.value)
    assert f"version {schema.VERSION + 1}" in text and "upgrade skunkqueue-postgres" in text


def test_processes_opening_a_fresh_schema_at_once_make_it_once(postgres: Any) -> None:
    name = _schema()
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            PostgresPersistence("q", url=postgres.url, db=name).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with psycopg.connect(postgres.url) as conn:
        assert schema.version_of(conn, name) == schema.VERSION


def test_a_user_who_may_not_create_the_schema_is_told_so_in_one_line(postgres: Any) -> None:
    user, password = f"u{uuid.uuid4().hex[:8]}", "Pw-limited-9c1d"
    postgres.psql(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'; REVOKE CREATE ON DATABASE postgres FROM PUBLIC")
    with pytest.raises(ConfigurationError) as caught:
        PostgresPersistence("q", url=postgres.url_for(user, password), db=_schema())
    assert "grant this user CREATE" in _one_line(caught.value)


# -- the claim's index --------------------------------------------------------------------


def test_the_claim_reads_the_partial_index_bounded_by_the_server_clock(postgres: Any,
                                                                      opened: Callable[..., Any]) -> None:
    name = _schema()
    store = opened("big", postgres.url, db=name)
    now = time.time()
    # A backlog of finished jobs and of jobs due later: neither may be read by a claim.
    store.enqueue([make_record("big", due=now + 3600) for _ in range(5000)])
    done = [make_record("big") for _ in range(5000)]
    store.enqueue(done)
    while store.claim("r", "w", 30, limit=1000):
        pass
    for record in store.list_jobs(state=RUNNING, limit=10_000):
        store.finish(record.id, record.token, policy.completed(b"1"))
    store.enqueue([make_record("big", due=now - 1)])
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f"ANALYZE {name}.jobs")
        statement = store._claim_statement().as_string(conn)
        params = {"queue": "big", "route": "r", "worker": "w", "lease": 10.0, "limit": 1}
        with conn.transaction(force_rollback=True):
            plan = "\n".join(row[0] for row in conn.execute(
                "EXPLAIN (ANALYZE, BUFFERS) " + statement, params).fetchall())
    assert "Index Scan using jobs_claim" in plan, plan
    assert "Index Cond: ((queue = 'big'::text) AND (route = 'r'::text) AND (due <=" in plan, plan
    # The scan stopped at the one due row: it never walked the 5,000 due later.
    assert "rows=1 loops=1" in plan.split("Index Scan using jobs_claim")[1].splitlines()[0], plan


def test_a_finish_and_the_next_claim_commit_together(postgres: Any, opened: Callable[..., Any], queue_name: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """One transaction, one WAL flush per job: a claim that fails after it ran takes the finish back with it."""
    store = opened(queue_name, postgres.url)
    first, second = make_record(queue_name), make_record(queue_name, due=time.time() + 0.001)
    store.enqueue([first])
    store.enqueue([second])
    (held,) = store.claim("r", "w", 30)
    assert held.id == first.id
    real_claim = store._claim

    def claim_then_fail(conn: Any, *args: Any, **kwargs: Any) -> Any:
        real_claim(conn, *args, **kwargs)
        raise RuntimeError("the claim's half broke")

    monkeypatch.setattr(store, "_claim", claim_then_fail)
    with pytest.raises(RuntimeError):
        store.finish_and_claim(held.id, held.token, policy.completed(b"1"), "r", "w", 30)
    monkeypatch.undo()
    # Neither half stands: the first job still runs under the same token, the second still waits.
    again = store.get(first.id)
    assert (again.state, again.token) == (RUNNING, held.token)
    assert store.get(second.id).state == PENDING
    recorded, claimed = store.finish_and_claim(held.id, held.token, policy.completed(b"1"), "r", "w", 30)
    assert recorded and [r.id for r in claimed] == [second.id]
    assert store.get(first.id).state == COMPLETE


# -- addresses and credentials --------------------------------------------------------------


def test_another_schemes_url_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigurationError) as caught:
        PostgresPersistence("q", url="redis://127.0.0.1:6379")
    assert "postgresql://" in _one_line(caught.value)


@pytest.mark.parametrize("url", ["host=127.0.0.1 nosuchoption=1", "host='127.0.0.1", "postgresql://[::1"])
def test_a_bad_connection_string_is_a_configuration_error(url: str) -> None:
    # libpq refuses these while parsing: nothing is contacted.
    with pytest.raises(ConfigurationError) as caught:
        PostgresPersistence("q", url=url)
    _one_line(caught.value)


def test_nothing_listening_is_backend_unavailable_naming_the_address() -> None:
    port = closed_port()
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as caught:
        PostgresPersistence("q", url=f"postgresql://postgres@127.0.0.1:{port}/postgres")
    assert f"127.0.0.1:{port}" in _one_line(caught.value)
    assert time.monotonic() - started < 10


def test_a_wrong_password_never_shows_the_password(make_postgres: Callable[..., Any]) -> None:
    server = make_postgres(password="Right-Pw-31f7")
    PostgresPersistence("q", url=server.url).close()  # the right one works
    wrong = server.url.replace("Right-Pw-31f7", "Wrong-Pw-8e2a")
    with pytest.raises(BackendUnavailable) as caught:
        PostgresPersistence("q", url=wrong)
    text = _one_line(caught.value)
    assert "Wrong-Pw-8e2a" not in text and "Right-Pw-31f7" not in text and "***" in text
    assert "password authentication failed" in text


def test_names_postgres_cannot_hold_are_refused_before_connecting() -> None:
    for queue, routes in (("a\x00b", ()), ("q", ("r\x00",)), ("x" * 2000, ())):
        with pytest.raises(ConfigurationError) as caught:
            PostgresPersistence.check_names(queue, routes)
        _one_line(caught.value)


def test_a_key_too_long_for_the_index_is_refused_in_one_line(postgres: Any, opened: Callable[..., Any]) -> None:
    store = opened("q", postgres.url, db=_schema())
    with pytest.raises(ConfigurationError) as caught:
        store.enqueue_keyed([make_record("q", key="k" * 5000)])
    assert "1024 bytes" in _one_line(caught.value)
    assert store.counts() == {}


# -- the clock ------------------------------------------------------------------------------


def test_connections_to_one_server_share_one_estimate_of_its_clock(postgres: Any, opened: Any,
                                                                   queue_name: str) -> None:
    # A pool's scheduler moves a slot's due time by its estimate of the server's clock, and the
    # connection it fires through moves it back by its own: two estimates differ by their round
    # trips' asymmetry (a skewed pool's slot ran 16 ms early in CI). One estimate per server and
    # process makes the two moves cancel.
    first, second = opened(queue_name, postgres.url), opened(queue_name + "-other", postgres.url)
    first.now()
    second.now()
    assert first._clock is not None and first._clock == second._clock


@pytest.mark.parametrize("skew", clockskew.SKEWS)
def test_a_skewed_host_uses_the_servers_clock(postgres: Any, opened: Callable[..., Any], queue_name: str,
                                              skew: float) -> None:
    clockskew.check_protocol_uses_the_store_clock(opened(queue_name, postgres.url, db="skunkqueue_skew"), skew)


@pytest.mark.parametrize("skew", clockskew.SKEWS)
def test_a_skewed_worker_runs_a_delayed_job_on_time(postgres: Any, queue_name: str, skew: float,
                                                    tmp_path: Path) -> None:
    backend = BackendUnderTest(name="postgres", url=postgres.url, db="skunkqueue_skew")
    clockskew.check_skewed_worker_runs_delayed_job_on_time(backend, queue_name, skew, tmp_path)


# -- a server that goes away -------------------------------------------------------------------


def test_workers_and_producers_carry_on_after_the_server_is_killed_and_restarted(
        make_postgres: Callable[..., Any], queue_name: str, tmp_path: Path) -> None:
    server = make_postgres(durable=True)
    backend = BackendUnderTest(name="postgres", url=server.url)
    queue = SkunkQueue(queue_name, backend="postgres", conn_url=server.url)
    add = queue.event(routes=["r"])(jobs.add.func)
    pool = PoolProcess(backend, queue_name, ["r"], log_path=tmp_path / "pool.log")
    try:
        pool.wait_ready()
        assert add.fire(1, 2).wait(timeout=20) == 3
        acknowledged = add.fire_at(timedelta(hours=1), 5, 5)  # stored before the crash: must survive it
        server.kill()
        with pytest.raises(BackendUnavailable):
            add.fire(2, 2)
        server.start()
        # The producer's and the idle worker's connections broke; each reconnects on its next call.
        assert add.fire(3, 4).wait(timeout=30) == 7
        kept = queue.get(acknowledged.id)
        assert kept is not None and kept.state == PENDING
        assert "Traceback" not in pool.log()
    finally:
        pool.stop()
        queue.close()


def test_a_waiter_for_a_result_is_woken_by_the_finish(postgres: Any, opened: Callable[..., Any],
                                                      queue_name: str) -> None:
    store = opened(queue_name, postgres.url)
    other = opened(queue_name, postgres.url)
    store.enqueue([make_record(queue_name)])
    [claimed] = other.claim("r", "w", 10)
    finished_at: list[float] = []

    def finish() -> None:
        time.sleep(0.3)
        other.finish(claimed.id, claimed.token, policy.completed(b"5"))
        finished_at.append(time.monotonic())

    thread = threading.Thread(target=finish)
    thread.start()
    record = store.wait_finished(claimed.id, 10)
    woke = time.monotonic()
    thread.join()
    assert record is not None and (record.state, record.result) == (COMPLETE, b"5")
    # Woken by the NOTIFY, not by its once-a-second look.
    assert woke - finished_at[0] < 0.2, woke - finished_at[0]


# -- using=: the application's own connection ------------------------------------------------


def test_fire_as_the_first_statement_of_a_transaction_is_rolled_back_with_it(postgres: Any,
                                                                             queue_name: str) -> None:
    queue = SkunkQueue(queue_name, backend="postgres", conn_url=postgres.url)
    add = queue.event(routes=["r"])(jobs.add.func)
    try:
        with psycopg.connect(postgres.url) as conn:
            first = add.fire(1, 2, using=conn)   # nothing else ran in this transaction yet
            conn.rollback()
            second = add.fire(3, 4, using=conn)  # the same connection again (its check is cached)
            conn.rollback()
        assert queue.get(first.id) is None and queue.get(second.id) is None
        assert queue.persistence.counts() == {}
    finally:
        queue.close()


def test_an_autocommit_connection_stores_at_once_and_a_failure_keeps_the_transaction_usable(
        postgres: Any, queue_name: str) -> None:
    queue = SkunkQueue(queue_name, backend="postgres", conn_url=postgres.url)
    add = queue.event(routes=["r"])(jobs.add.func)
    try:
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            stored = add.fire(1, 2, using=conn)
        assert queue.get(stored.id) is not None
        with psycopg.connect(postgres.url) as conn:
            conn.execute("CREATE TEMP TABLE t (x int)")
            with pytest.raises(ConfigurationError):
                add.fire(1, 2, key="k" * 5000, using=conn)  # refused before anything reached the server
            conn.execute("INSERT INTO t VALUES (1)")  # the application's transaction carries on
            kept = add.fire(5, 6, using=conn)
            conn.commit()
        assert queue.get(kept.id) is not None
    finally:
        queue.close()


def test_a_connection_to_another_database_is_refused_in_one_line(postgres: Any, queue_name: str) -> None:
    database = f"other_{uuid.uuid4().hex[:8]}"
    postgres.psql(f"CREATE DATABASE {database}")
    queue = SkunkQueue(queue_name, backend="postgres", conn_url=postgres.url)
    add = queue.event(routes=["r"])(jobs.add.func)
    try:
        with psycopg.connect(postgres.url.rsplit("/", 1)[0] + "/" + database) as conn:
            with pytest.raises(ConfigurationError) as caught:
                add.fire(1, 2, using=conn)
        assert database in _one_line(caught.value)
        assert queue.persistence.counts() == {}
    finally:
        queue.close()


def test_an_asyncio_connection_is_refused_in_one_line(postgres: Any, queue_name: str) -> None:
    import asyncio

    async def refused() -> str:
        conn = await psycopg.AsyncConnection.connect(postgres.url)
        try:
            with pytest.raises(ConfigurationError) as caught:
                add.fire(1, 2, using=conn)
            return _one_line(caught.value)
        finally:
            await conn.close()

    queue = SkunkQueue(queue_name, backend="postgres", conn_url=postgres.url)
    add = queue.event(routes=["r"])(jobs.add.func)
    try:
        assert "psycopg.AsyncConnection" in asyncio.run(refused())
    finally:
        queue.close()


def test_a_busy_worker_keeps_no_backlog_of_notifications(postgres: Any, opened: Callable[..., Any],
                                                         queue_name: str) -> None:
    worker = opened(queue_name, postgres.url)
    producer = opened(queue_name, postgres.url)
    worker.wait_for_work("r", "w", 0.01)  # now LISTENing on the route's channel
    for _ in range(300):  # fired one by one while the worker is busy and never waits
        producer.enqueue([make_record(queue_name)])
    assert len(worker.claim("r", "w", 30, limit=300)) == 300  # the worker's connection read all 300 NOTIFYs
    # psycopg keeps notifications that arrive outside its notifies() generator unless a handler takes
    # them; the backend's handler does, so nothing piles up (a generator-only design grew by one per job).
    assert worker._conn._notifies_backlog is not None, "psycopg changed: find where it keeps notifications"
    assert len(worker._conn._notifies_backlog) == 0


# -- a commit that fails: before applying (a deferred constraint), and after (the answer lost) ----


def test_a_commit_refused_by_a_deferred_constraint_leaves_no_job(postgres: Any, queue_name: str,
                                                                 tmp_path: Path) -> None:
    """The COMMIT itself fails (a deferred check runs only then): the job goes with the row."""
    queue = SkunkQueue(queue_name, backend="postgres", conn_url=postgres.url)
    mark = queue.event(routes=["r"])(jobs.mark.func)
    table = f"orders_{uuid.uuid4().hex[:8]}"
    runs = tmp_path / "runs"
    try:
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {table} (id text PRIMARY KEY, "
                         f"parent text REFERENCES {table} (id) DEFERRABLE INITIALLY DEFERRED)")
        with psycopg.connect(postgres.url) as conn:
            conn.execute(f"INSERT INTO {table} VALUES ('o1', 'no such order')")  # checked at COMMIT
            doomed = mark.fire(str(runs), "o1", using=conn)
            with pytest.raises(psycopg.errors.ForeignKeyViolation):
                conn.commit()
        assert queue.get(doomed.id) is None and queue.persistence.counts() == {}
        pool = PoolProcess(BackendUnderTest(name="postgres", url=postgres.url), queue_name, ["r"],
                           log_path=tmp_path / "pool.log")
        try:
            pool.wait_ready()
            time.sleep(1.0)  # a worker had the time to claim it, were it there
        finally:
            pool.stop()
        assert not runs.exists()
    finally:
        queue.close()


def test_a_commit_applied_whose_answer_is_lost_keeps_row_and_job_together(
        make_postgres: Callable[..., Any], queue_name: str, tmp_path: Path) -> None:
    """The server commits, then the app's connection dies before the answer reaches it.

    Made real with synchronous replication to a standby that never comes: the app's COMMIT is
    applied locally and then waits; a second session terminates it, and the app gets an error for
    a transaction that did commit. The recipe docs/guides/transactional.md gives — retry the whole transaction with
    the same idempotency key and an idempotent row write — must end with one row, one job, one run.
    """
    # Every session but the app's commits without waiting for a standby (synchronous_commit=local).
    server = make_postgres(settings={"synchronous_standby_names": "'ghost'", "synchronous_commit": "local"})
    queue = SkunkQueue(queue_name, backend="postgres", conn_url=server.url)
    mark = queue.event(routes=["r"])(jobs.mark.func)
    runs = tmp_path / "runs"
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id text PRIMARY KEY)")

    def place_order(order: str, wait_for_standby: bool) -> None:
        with psycopg.connect(server.url) as conn:
            if wait_for_standby:
                conn.execute("SET synchronous_commit = on")
            conn.execute("INSERT INTO orders VALUES (%s) ON CONFLICT DO NOTHING", (order,))
            mark.fire(str(runs), order, key=f"order-{order}", using=conn)
            conn.commit()

    failures: list[BaseException] = []

    def doomed() -> None:
        try:
            place_order("o1", wait_for_standby=True)
        except BaseException as exc:  # the test inspects it
            failures.append(exc)

    app = threading.Thread(target=doomed)
    try:
        app.start()
        with psycopg.connect(server.url, autocommit=True) as admin:
            deadline = time.monotonic() + 30
            while not admin.execute("SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep'").fetchall():
                assert time.monotonic() < deadline, "the app's COMMIT never reached the wait for the standby"
                time.sleep(0.02)
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE wait_event = 'SyncRep'")
        app.join(30)
        assert len(failures) == 1 and isinstance(failures[0], psycopg.OperationalError), failures
        # The app was told "failed", yet the transaction is there: row and job both.
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT count(*) FROM orders").fetchone() == (1,)
        assert sum(queue.persistence.counts().values()) == 1
        place_order("o1", wait_for_standby=False)  # the app retries, as docs/guides/transactional.md says
        with psycopg.connect(server.url) as conn:
            assert conn.execute("SELECT count(*) FROM orders").fetchone() == (1,)
        assert sum(queue.persistence.counts().values()) == 1
        pool = PoolProcess(BackendUnderTest(name="postgres", url=server.url), queue_name, ["r"],
                           log_path=tmp_path / "pool.log")
        try:
            pool.wait_ready()
            deadline = time.monotonic() + 30
            while not runs.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # a second run, were there one, has had the time to start
        finally:
            pool.stop()
        assert runs.read_text().split() == ["o1"]
    finally:
        app.join(5)
        queue.close()


# -- flow control: what the kit's burst test can only meet by chance ------------------------


def test_burst_waits_while_another_claim_decides_on_the_key(postgres: Any, opened: Callable[..., Any],
                                                            queue_name: str, tmp_path: Path) -> None:
    """A claim that finds a key's lock taken (another claim is deciding on that key) skips the
    key's jobs for BUSY_KEY_PAUSE rather than wait inside its transaction. The job is due and
    free all along, so flow_waiting does not count it: a ``--burst`` worker must not take the
    empty claim for "nothing due" and exit. In the kit's burst test two workers of one pool meet
    this way under load (one finishing k1 and claiming, the other woken by that finish, still
    counting k1 as running while it holds the key's lock), and the pool exited with k2 pending."""
    from skunkqueue_postgres.persistence import FLOW_LOCK

    from skunkqueue.flow import Limit

    backend = BackendUnderTest(name="postgres", url=postgres.url)
    queue = SkunkQueue(queue_name, backend="postgres", conn_url=postgres.url)
    store = opened(queue_name, postgres.url)
    add = queue.event(routes=["r"], limit=Limit(concurrency=1))(jobs.add.func)
    handle = add.fire(1, 2)
    record = store.get(handle.id)
    assert record is not None and record.limit_key is not None
    lock = (FLOW_LOCK, "\n".join((store.schema, queue_name, "k", record.limit_key)))
    pool = None
    try:
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            # Held as a deciding claim holds it (the same lock, taken for longer).
            conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", lock)
            pool = PoolProcess(backend, queue_name, ["r"], extra=["--burst"], log_path=tmp_path / "pool.log")
            # Its worker registers, then claims: a worker that exits on the empty claim does so
            # well within 2 s of registering (unfixed, it did at once).
            started = time.monotonic()
            while pool.process.poll() is None and not store.workers() and time.monotonic() - started < 30:
                time.sleep(0.05)
            assert store.workers() or pool.process.poll() is not None, "the pool's worker never registered"
            deadline = time.monotonic() + 2.0
            while pool.process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert pool.process.poll() is None, f"--burst exited with a due job on a busy key: {pool.log()}"
            conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", lock)
        assert pool.wait(60) == 0, pool.log()
        assert "no due job left" in pool.log()
        assert handle.wait(timeout=5) == 3
        done = store.get(handle.id)
        assert done is not None and (done.state, done.attempts) == (COMPLETE, 1)
    finally:
        if pool is not None:
            pool.stop()
        queue.close()
