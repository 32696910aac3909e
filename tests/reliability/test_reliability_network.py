"""A misbehaving network between the workers, the producers and the store (tests/faultproxy.py).

Per backend (Redis, MongoDB as a one-node replica set, PostgreSQL), each its own
server: two producers (``fire``, ``afire``) and pool A talk to the store through
proxy A; pool B through proxy B, so that B alone can be cut off. Leases are 4 s.
The faults, in turn, while jobs flow: latency with jitter; every connection
reset; a blackhole that heals; half-open connections (the store's side closed,
the client's left silent); then pool B partitioned for longer than a lease while
it runs jobs. Every fire, start and end goes into the history; the checker must
find nothing lost, no two attempts of a job at once, no job unfinished, and
both pools, never restarted, still working at the end.

Clocks: pool B's host clock runs 60 s ahead (``skunkqueue.testing.clocks``), so the
partitioned pool is also the one whose clock is wrong; under ``make chaos`` a third
pool, through proxy A, runs 60 s behind. Every 20th fire is delayed 1.5 s, and
every pool runs a periodic job each second: the checker also finds no job started
before it was due and every periodic slot fired exactly once.

The CI mix runs each fault once (~30-60 s a backend); ``make chaos``
(SKUNQ_CHAOS=long) runs four rounds with random durations.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import history
import pytest
from clockskew import first_log_time
from failover_load import Load
from faultproxy import FaultProxy

from skunkqueue.testing.clocks import skewed
from skunkqueue.testing.kit import BackendUnderTest

LONG = os.environ.get("SKUNQ_CHAOS") == "long"
LEASE = 4.0


@pytest.fixture(params=["redis", "mongodb", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """(backend name, a server with .port) started for this test alone."""
    name = request.param
    where = tmp_path_factory.mktemp(f"net-{name}")
    if name == "redis":
        redis_servers = pytest.importorskip("redis_servers")
        pytest.importorskip("skunkqueue_redis", reason="skunkqueue-redis is not installed")
        server: Any = redis_servers.RedisServer(where).start()
        yield name, server
        server.stop()
    elif name == "mongodb":
        pytest.importorskip("skunkqueue_mongo", reason="skunkqueue-mongo is not installed")
        import mongo_servers

        server = mongo_servers.MongoServer(where, replset=True).start()
        yield name, server
        server.stop()
    else:
        pytest.importorskip("skunkqueue_postgres", reason="skunkqueue-postgres is not installed")
        import postgres_servers

        server = postgres_servers.PostgresServer(where).start()
        yield name, server
        server.stop()
        server.destroy()


@pytest.fixture
def net_queue() -> str:
    # Not the suite's queue_name: that one is tied to its per-backend ``target`` servers.
    return f"net-{uuid.uuid4().hex[:10]}"


def through(name: str, proxy: FaultProxy) -> BackendUnderTest:
    """The backend, addressed at ``proxy``."""
    if name == "redis":
        return BackendUnderTest(name="redis", url=f"redis://127.0.0.1:{proxy.port}", db="0")
    if name == "mongodb":
        # directConnection: a replica set's members would otherwise be reached at the addresses
        # they announce, around the proxy.
        return BackendUnderTest(name="mongodb", url=f"mongodb://127.0.0.1:{proxy.port}/?directConnection=true",
                                db="netfaults")
    return BackendUnderTest(name="postgres", url=f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres",
                            db="netfaults")


def fault_mix(a: FaultProxy, b: FaultProxy, rng: random.Random, scale: float) -> list[tuple[str, Callable[[], Any]]]:
    """The faults, in order: (name, the action; it returns when the fault is over)."""
    def latency() -> None:
        a.set(latency=0.05 * scale, jitter=0.1 * scale)
        time.sleep(3 * scale)
        a.set(latency=0.0, jitter=0.0)

    def resets() -> None:
        for _ in range(3):
            a.reset()
            time.sleep(0.5 + rng.random())

    def blackhole() -> None:
        seconds = 2 + rng.random() * 2 * scale
        a.blackhole(seconds)
        time.sleep(seconds)

    def half_open() -> None:
        assert a.half_open() > 0, "no open connection to half-open"
        time.sleep(1)

    def partition_b() -> None:
        seconds = LEASE * (1.5 + rng.random() * scale)
        b.blackhole(seconds)
        time.sleep(seconds)

    return [("latency", latency), ("resets", resets), ("blackhole", blackhole), ("half-open", half_open),
            ("partition of pool B", partition_b)]


def run_mix(store: tuple[str, Any], queue_name: str, tmp_path: Path, rounds: int, scale: float,
            per_phase: int, only: set[str] | None = None, recover_within: float = 45.0,
            skew_b: float = 0.0, skew_c: float | None = None) -> Load:
    """``skew_b``: pool B's clock offset (s); ``skew_c``: if given, a third pool (through proxy A)
    with that offset. Every pool also runs the periodic ``tick`` each second."""
    name, server = store
    rng = random.Random(os.getpid())
    with FaultProxy("127.0.0.1", server.port, seed=1) as a, FaultProxy("127.0.0.1", server.port, seed=2) as b:
        load = Load(through(name, a), queue_name, tmp_path, pause=0.2, lease=LEASE, every=0.1, delayed=20)
        ticking = {"SKUNQ_HISTORY": load.history.path, "SKUNQ_HISTORY_EVERY": "1"}

        def clock(backend: BackendUnderTest, skew: float, folder: str) -> BackendUnderTest:
            return skewed(backend, skew, tmp_path / folder) if skew else backend

        pools = [load.start_pool(concurrency=2, env=ticking),
                 load.start_pool(concurrency=2, on=clock(through(name, b), skew_b, "skew-b"), env=ticking)]
        if skew_c is not None:
            pools.append(load.start_pool(concurrency=2, on=clock(through(name, a), skew_c, "skew-c"), env=ticking))
        done: list[str] = []
        try:
            for pool in pools:
                pool.wait_ready(60)
            for pool, skew in zip(pools[1:], [skew_b, skew_c or 0.0]):
                # The pool is really skewed: its log lines carry its own clock.
                assert abs(first_log_time(pool.log_head()) - time.time() - skew) < 10, pool.log_head()
            # Periodic slots from here to the last fault's recovery must each fire once.
            window_start = time.time() + 3
            load.start_producers()
            for _ in range(rounds):
                for fault, act in fault_mix(a, b, rng, scale):
                    if only is not None and fault not in only:
                        continue
                    load.wait_acked(per_phase, time.monotonic() - 5, what=f"before {fault}")
                    act()
                    healed = time.monotonic()
                    load.wait_acked(per_phase, healed, timeout=recover_within, what=f"after {fault}")
                    done.append(fault)
            window_stop = time.time() - 3
            load.stop_producers()
            load.drain(timeout=90)
            for pool in pools:
                assert pool.process.poll() is None, f"a pool exited: {pool.log()}"
        finally:
            load.close(timeout=5)
    report = load.report(schedules={"tick": history.Schedule(every=1.0, start=window_start, stop=window_stop)})
    events = history.load(load.history.path)
    slots = sum(1 for e in events if e["op"] == "start" and e["token"].startswith("slot:"))
    delayed = sum(1 for e in events if e["op"] == "invoke" and "due" in e)
    clocks = ", ".join(f"{s:+.0f} s" for s in [0.0, skew_b] + ([] if skew_c is None else [skew_c]))
    print(f"\n{name} through a faulty network ({len(done)} faults; proxy A {a.connections_made} connections, "
          f"{a.resets_sent} reset; pool clocks {clocks}; {delayed} fires delayed, {slots} periodic slots): "
          f"{report.summary()}")
    assert slots >= window_stop - window_start - 1, "the periodic job hardly ran: the slot check saw nothing"
    assert delayed, "no delayed fire: the early check saw nothing"
    assert report.ok, report.explain()
    assert not load.unexpected_errors(), load.unexpected_errors()[:5]
    assert done, "no fault was injected"
    return load


def longest_fire(load: Load) -> float:
    """Seconds from a fire's call to its answer (acknowledged or raised), the longest of the run."""
    called: dict[str, float] = {}
    longest = 0.0
    for event in history.load(load.history.path):
        if event["op"] == "invoke":
            called[event["token"]] = event["t"]
        elif event["op"] in ("ok", "fail"):
            longest = max(longest, event["t"] - called[event["token"]])
    return longest


def test_a_fault_mix_loses_nothing_and_runs_nothing_twice_at_once(store: tuple[str, Any], net_queue: str,
                                                                   tmp_path: Path) -> None:
    run_mix(store, net_queue, tmp_path, rounds=1, scale=1.0, per_phase=20, skew_b=60.0)


@pytest.mark.chaos
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not LONG, reason="long network fault mix: make chaos (SKUNQ_CHAOS=long)")
def test_four_rounds_of_network_faults(store: tuple[str, Any], net_queue: str, tmp_path: Path) -> None:
    run_mix(store, net_queue, tmp_path, rounds=4, scale=2.0, per_phase=60, skew_b=60.0, skew_c=-60.0)


@pytest.mark.slow  # starts a server (conftest's marking cannot see it: no server fixture)
def test_postgres_half_open_connection(tmp_path_factory: pytest.TempPathFactory, net_queue: str,
                                       tmp_path: Path) -> None:
    """A half-open connection (the store's side closed, the client's peer still acknowledging, as a
    stuck middlebox does) hung the PostgreSQL backend's producers and workers for good: psycopg has
    no read timeout, and TCP keepalives cannot notice (the peer answers them). Each call now has a
    deadline (call_timeout, 15 s by default) past which its socket is shut down: a fire stuck on a
    dead connection is retried on a new one and acknowledged, after the deadline and not much more."""
    pytest.importorskip("skunkqueue_postgres", reason="skunkqueue-postgres is not installed")
    import postgres_servers
    from skunkqueue_postgres.persistence import DEFAULT_CALL_TIMEOUT

    server = postgres_servers.PostgresServer(tmp_path_factory.mktemp("net-pg-half-open")).start()
    try:
        load = run_mix(("postgres", server), net_queue, tmp_path, rounds=1, scale=1.0, per_phase=10,
                       only={"half-open"}, recover_within=DEFAULT_CALL_TIMEOUT + 5)
        longest = longest_fire(load)
        print(f"longest fire: {longest:.2f} s")
        # At least the deadline: the producers' connections were cut off, and the deadline is what
        # ended their wait (before it, they waited for good).
        assert DEFAULT_CALL_TIMEOUT - 0.5 <= longest <= DEFAULT_CALL_TIMEOUT + 5
    finally:
        server.stop()
        server.destroy()
