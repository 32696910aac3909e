"""Every call has a deadline (call_timeout): a silent server or a half-open link cannot hold a caller.

The half-open link is tests/faultproxy.py's: the server's side of each open
connection closed, the client's left open and silent (what it sends is
swallowed, so its kernel sees its data acknowledged and keepalives answered).
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable

import pytest
from faultproxy import FaultProxy
from skunkqueue_postgres.persistence import DEFAULT_CALL_TIMEOUT, PostgresPersistence, take_call_timeout

from skunkqueue.errors import BackendUnavailable, ConfigurationError
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import RUNNING
from skunkqueue.testing import jobs
from skunkqueue.testing.suite_support import make_record


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    return text


def _through(proxy: FaultProxy, postgres: Any, query: str = "") -> str:
    return postgres.url.replace(f":{postgres.port}/", f":{proxy.port}/") + query


# -- the option ------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "left", "seconds"), [
    ("postgresql://u@h/db", "postgresql://u@h/db", None),
    ("postgresql://u@h/db?call_timeout=2.5", "postgresql://u@h/db", 2.5),
    ("postgresql://u@h/db?sslmode=disable&call_timeout=0&application_name=a",
     "postgresql://u@h/db?sslmode=disable&application_name=a", 0.0),
    ("postgresql://u@h/db?call%5Ftimeout=7", "postgresql://u@h/db", 7.0),
    ("host=h dbname=db call_timeout=3", "host=h dbname=db", 3.0),
    ("call_timeout = '4' host=h", "host=h", 4.0),
    ("host=h password='a call_timeout'", "host=h password='a call_timeout'", None),
])
def test_call_timeout_is_taken_out_of_the_address_before_libpq_sees_it(url: str, left: str,
                                                                       seconds: float | None) -> None:
    assert take_call_timeout(url, "(address)") == (left, seconds)


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf", ""])
def test_a_bad_call_timeout_is_refused_in_one_line_before_connecting(value: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        PostgresPersistence("q", url=f"postgresql://postgres:Secret-Pw-4a@127.0.0.1:1/db?call_timeout={value}")
    text = _one_line(caught.value)
    assert "call_timeout" in text and "Secret-Pw-4a" not in text


def test_the_default_and_a_given_deadline(postgres: Any, opened: Callable[..., Any]) -> None:
    assert opened("q", postgres.url).call_timeout == DEFAULT_CALL_TIMEOUT
    store = opened("q", postgres.url + "?call_timeout=2")
    assert store.call_timeout == 2.0
    store.get("nothing")  # libpq was given the address without our option


# -- a half-open link ----------------------------------------------------------------


def test_a_fire_on_a_half_open_connection_is_stored_on_a_new_one_after_the_deadline(
        postgres: Any, queue_name: str) -> None:
    with FaultProxy("127.0.0.1", postgres.port) as proxy:
        q = SkunkQueue(queue_name, backend="postgres", conn_url=_through(proxy, postgres, "?call_timeout=1"))
        try:
            job = q.event(routes=["r"])(jobs.add.func)
            job.fire(0, 0)
            assert proxy.half_open() == 1
            started = time.monotonic()
            handle = job.fire(1, 1)
            took = time.monotonic() - started
            # Cut at the deadline (not earlier: the call was waiting), then stored on a new connection.
            assert 1.0 <= took < 4.0, took
            assert q.persistence.get(handle.id) is not None
            assert proxy.connections_made == 2
        finally:
            q.close()


def test_a_claim_on_a_half_open_connection_raises_at_the_deadline_and_the_next_one_works(
        postgres: Any, opened: Callable[..., Any], queue_name: str) -> None:
    with FaultProxy("127.0.0.1", postgres.port) as proxy:
        store = opened(queue_name, _through(proxy, postgres, "?call_timeout=1"))
        store.enqueue([record := make_record(queue_name)])
        assert proxy.half_open() == 1
        started = time.monotonic()
        # Not repeated on a new connection: its first try may have been applied (here it never arrived).
        with pytest.raises(BackendUnavailable) as caught:
            store.claim("r", "w1", 30.0)
        assert 1.0 <= time.monotonic() - started < 4.0
        assert "no reply within 1 s (call_timeout)" in _one_line(caught.value)
        claimed = store.claim("r", "w1", 30.0)
        assert [r.id for r in claimed] == [record.id] and claimed[0].state == RUNNING


def test_a_blackholed_store_refuses_a_fire_in_bounded_time_and_serves_it_after(
        postgres: Any, queue_name: str) -> None:
    with FaultProxy("127.0.0.1", postgres.port) as proxy:
        q = SkunkQueue(queue_name, backend="postgres", conn_url=_through(proxy, postgres, "?call_timeout=1"))
        try:
            job = q.event(routes=["r"])(jobs.add.func)
            job.fire(0, 0)
            proxy.blackhole(60)
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                job.fire(1, 1)
            # The deadline, then a new connection's connect_timeout (5 s by default).
            assert time.monotonic() - started < 1 + 5 + 2
            proxy.clear()
            assert q.persistence.get(job.fire(2, 2).id) is not None
        finally:
            q.close()


# -- what the deadline must not cut ------------------------------------------------------


def test_an_idle_wait_longer_than_the_deadline_is_not_cut(postgres: Any, opened: Callable[..., Any],
                                                          queue_name: str) -> None:
    store = opened(queue_name, postgres.url + "?call_timeout=0.3")
    store.get("warm")
    conn = store._conn
    started = time.monotonic()
    store.wait_for_work("r", "w1", timeout=1.2)
    assert time.monotonic() - started >= 1.1
    waiter = make_record(queue_name)
    store.enqueue([waiter])
    assert store.wait_finished(waiter.id, timeout=1.5) is not None  # pending still, after 1.5 s
    assert store._conn is conn, "an idle wait cost the connection"


def test_call_timeout_0_sets_no_deadline(postgres: Any, opened: Callable[..., Any], queue_name: str) -> None:
    store = opened(queue_name, postgres.url + "?call_timeout=0")
    store._call("sleep", lambda conn: conn.execute("SELECT pg_sleep(0.5)"), idempotent=False)


def test_a_statement_longer_than_the_deadline_is_cut_and_says_so(postgres: Any, opened: Callable[..., Any],
                                                                 queue_name: str) -> None:
    # What the deadline costs: a call still running when it passes fails, healthy server or not.
    store = opened(queue_name, postgres.url + "?call_timeout=0.3")
    with pytest.raises(BackendUnavailable) as caught:
        store._call("sleep", lambda conn: conn.execute("SELECT pg_sleep(3)"), idempotent=False)
    assert "call_timeout" in _one_line(caught.value)
    assert store.get("x") is None  # on a new connection


def test_a_deadline_passing_as_a_call_ends_never_reaches_the_next_call(postgres: Any, opened: Callable[..., Any],
                                                                       queue_name: str) -> None:
    # Calls that last about as long as the deadline: each one either answers or is cut, and a late
    # shutdown never lands on the connection's next call (which is not retried, so it would show).
    store = opened(queue_name, postgres.url)
    rng = random.Random(7)
    answered = cut = 0
    for _ in range(60):
        store.call_timeout = 0.05
        try:
            store._call("sleep", lambda conn: conn.execute("SELECT pg_sleep(%s)", (rng.uniform(0.0, 0.1),)),
                        idempotent=False)
            answered += 1
        except BackendUnavailable:
            cut += 1
        store.call_timeout = 15.0
        row = store._call("next", lambda conn: conn.execute("SELECT 1 AS one").fetchone(), idempotent=False)
        assert row == {"one": 1}
    assert answered and cut, (answered, cut)

