"""The FoundationDB STAND-IN's own tests: it must behave like FoundationDB where the backend relies on it.

Skipped when SKUNKQUEUE_FDB_CLUSTER_FILE is set (that run loads the real bindings).
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

NOT_COMMITTED, TOO_OLD, TIMED_OUT, CANCELLED = 1020, 1007, 1031, 1101
TRANSACTION_TOO_LARGE, KEY_TOO_LARGE, VALUE_TOO_LARGE = 2101, 2102, 2103


@pytest.fixture
def fdb(standin_cluster: Any) -> Any:
    import fdb as module

    assert module.STANDIN
    module.api_version(710)
    return module


@pytest.fixture
def db(fdb: Any, standin_cluster: Any) -> Any:
    return fdb.open(standin_cluster.cluster_file)


@pytest.fixture
def space(fdb: Any) -> Any:
    return fdb.Subspace(("standin-test", uuid.uuid4().hex))


def _counter(value: Any) -> int:
    return int.from_bytes(bytes(value), "little") if value.present() else 0


class TestFDBStandIn:
    """Stand-in behaviour the backend depends on."""

    def test_conflicting_write_is_rejected_with_1020(self, fdb: Any, db: Any, space: Any) -> None:
        key = space.pack(("k",))
        first, second = db.create_transaction(), db.create_transaction()
        assert not first[key].present() and not second[key].present()
        first[key] = b"first"
        second[key] = b"second"
        first.commit().wait()
        with pytest.raises(fdb.FDBError) as info:
            second.commit().wait()
        assert info.value.code == NOT_COMMITTED and "conflict" in str(info.value)
        assert bytes(db[key]) == b"first"

    def test_transactional_retries_a_conflict_on_fresh_data(self, fdb: Any, db: Any, space: Any) -> None:
        key = space.pack(("n",))
        attempts: list[int] = []

        @fdb.transactional
        def increment(tr: Any) -> None:
            seen = _counter(tr[key])
            attempts.append(seen)
            if len(attempts) == 1:  # someone else commits between our read and our commit
                db.set(key, (10).to_bytes(8, "little"))
            tr[key] = (seen + 1).to_bytes(8, "little")

        increment(db)
        assert attempts == [0, 10]
        assert _counter(db[key]) == 11

    def test_snapshot_reads_add_no_conflict(self, fdb: Any, db: Any, space: Any) -> None:
        watched, other = space.pack(("watched",)), space.pack(("other",))
        for snapshot in (True, False):
            tr = db.create_transaction()
            (tr.snapshot if snapshot else tr).get_range(space.range().start, space.range().stop)
            db.set(watched, b"changed by someone else")
            tr[other] = b"mine"
            if snapshot:
                tr.commit().wait()
            else:
                with pytest.raises(fdb.FDBError) as info:
                    tr.commit().wait()
                assert info.value.code == NOT_COMMITTED

    def test_limited_range_read_conflicts_only_on_what_it_returned(self, fdb: Any, db: Any, space: Any) -> None:
        for name in ("a", "b", "c"):
            db.set(space.pack((name,)), b"x")
        tr = db.create_transaction()
        assert [space.unpack(kv.key) for kv in tr.get_range(space.range().start, space.range().stop, limit=1)] \
            == [("a",)]
        db.set(space.pack(("c",)), b"changed beyond what was read")
        tr[space.pack(("z",))] = b"mine"
        tr.commit().wait()

    def test_range_reads_are_iterables_without_a_length_as_in_fdb(self, db: Any, space: Any) -> None:
        rows = db.create_transaction().get_range(space.range().start, space.range().stop)
        assert rows and list(rows) == [] and rows.to_list() == []  # an empty range is still true
        with pytest.raises(TypeError):
            len(rows)  # type: ignore[arg-type]

    def test_reads_see_the_transactions_own_writes(self, db: Any, space: Any) -> None:
        tr = db.create_transaction()
        tr[space.pack(("a",))] = b"1"
        tr.add(space.pack(("n",)), (5).to_bytes(8, "little"))
        tr.clear(space.pack(("a",)))
        tr[space.pack(("b",))] = b"2"
        assert not tr[space.pack(("a",))].present()
        assert [kv.value for kv in tr.get_range(space.range().start, space.range().stop)] == \
            [b"2", (5).to_bytes(8, "little")]
        tr.commit().wait()
        assert bytes(db[space.pack(("b",))]) == b"2"

    def test_atomic_adds_from_concurrent_clients_sum_up_without_conflicts(self, fdb: Any, db: Any,
                                                                          space: Any) -> None:
        key = space.pack(("total",))
        attempts = []

        @fdb.transactional
        def add(tr: Any, amount: int) -> None:
            attempts.append(amount)
            tr.add(key, amount.to_bytes(8, "little"))

        def client(amount: int) -> None:
            for _ in range(40):
                add(db, amount)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(1, 7)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert _counter(db[key]) == 40 * sum(range(1, 7))
        assert len(attempts) == 240  # atomic ops never conflict, so nothing was retried

    def test_versionstamps_are_unique_and_increase_with_commit_order(self, fdb: Any, db: Any, space: Any) -> None:
        stamps = []
        for i in range(10):
            tr = db.create_transaction()
            for user in (1, 0):  # the user version orders keys within one transaction
                tr.set_versionstamped_key(space.pack_with_versionstamp(
                    ("log", fdb.tuple.Versionstamp(user_version=user), i)), b"")
            future = tr.get_versionstamp()
            tr.commit().wait()
            stamps.append(bytes(future.wait()))
        assert len(set(stamps)) == 10 and stamps == sorted(stamps) and all(len(s) == 10 for s in stamps)
        logged = [space.unpack(kv.key) for kv in db.get_range(space.range(("log",)).start, space.range(("log",)).stop)]
        assert [entry[2] for entry in logged] == [i for i in range(10) for _ in (0, 1)]
        assert [entry[1].tr_version for entry in logged[::2]] == stamps
        assert [entry[1].user_version for entry in logged[:2]] == [0, 1]

    def test_versionstamped_value_carries_the_commit_stamp(self, fdb: Any, db: Any, space: Any) -> None:
        tr = db.create_transaction()
        packed = space.pack_with_versionstamp(("ref", fdb.tuple.Versionstamp()))
        tr.set_versionstamped_key(packed, b"")
        tr.set_versionstamped_value(space.pack(("pointer",)), packed)
        tr.commit().wait()
        pointer = bytes(db[space.pack(("pointer",))])
        assert db[pointer].present() and space.unpack(pointer)[1].is_complete()

    def test_watch_fires_when_the_value_changes(self, fdb: Any, db: Any, space: Any) -> None:
        key = space.pack(("wake",))

        @fdb.transactional
        def arm(tr: Any) -> Any:
            return tr.watch(key)

        watch = arm(db)
        time.sleep(0.3)
        assert not watch.is_ready()
        db.set(key, b"")  # an unset key becoming empty is a change
        deadline = time.monotonic() + 5
        while not watch.is_ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert watch.is_ready()
        watch.wait()

        again = arm(db)
        again.cancel()
        with pytest.raises(fdb.FDBError) as info:
            again.wait()
        assert info.value.code == CANCELLED

    def test_watch_compares_with_the_value_the_transaction_saw(self, fdb: Any, db: Any, space: Any) -> None:
        key = space.pack(("seen",))
        tr = db.create_transaction()
        tr.get_read_version().wait()
        watch = tr.watch(key)
        db.set(key, b"changed after the read version")  # before the watch is even registered
        tr.commit().wait()
        fired = threading.Event()
        watch.on_ready(lambda _f: fired.set())
        assert fired.wait(5)

    @pytest.mark.parametrize(("key_size", "value_size", "code"), [
        (10_001, 10, KEY_TOO_LARGE), (10, 100_001, VALUE_TOO_LARGE)])
    def test_key_and_value_limits(self, fdb: Any, db: Any, space: Any, key_size: int, value_size: int,
                                  code: int) -> None:
        tr = db.create_transaction()
        tr[space.key() + b"k" * key_size] = b"v" * value_size
        with pytest.raises(fdb.FDBError) as info:
            tr.commit().wait()
        assert info.value.code == code
        at_limit = db.create_transaction()
        at_limit[space.pack(("ok",))] = b"v" * 100_000
        at_limit.commit().wait()

    def test_transaction_size_limit(self, fdb: Any, db: Any, space: Any) -> None:
        tr = db.create_transaction()
        for i in range(105):
            tr[space.pack((i,))] = b"v" * 99_000
        with pytest.raises(fdb.FDBError) as info:
            tr.commit().wait()
        assert info.value.code == TRANSACTION_TOO_LARGE
        assert db.get_range(space.range().start, space.range().stop) == []

    def test_five_second_limit_and_retry(self, fdb: Any, db: Any, space: Any) -> None:
        key = space.pack(("old",))
        tr = db.create_transaction()
        tr.get_read_version().wait()
        time.sleep(5.3)
        with pytest.raises(fdb.FDBError) as info:
            tr[key].wait()
        assert info.value.code == TOO_OLD
        tr.on_error(info.value).wait()  # retryable: the transaction starts over with a new read version
        tr[key] = b"fresh"
        tr.commit().wait()
        assert bytes(db[key]) == b"fresh"

    def test_timeout_option_and_unreachable_cluster(self, fdb: Any, tmp_path: Path) -> None:
        cluster_file = tmp_path / "nowhere.cluster"
        cluster_file.write_text("standin:x@127.0.0.1:9\n")  # the discard port: nothing listens
        nowhere = fdb.open(str(cluster_file))
        nowhere.options.set_transaction_timeout(500)
        started = time.monotonic()
        with pytest.raises(fdb.FDBError) as info:
            fdb.transactional(lambda tr: tr[b"k"].wait())(nowhere)
        assert info.value.code == TIMED_OUT and time.monotonic() - started < 5


@pytest.fixture
def faults(fdb: Any) -> Any:
    from fdb.standin_faults import FAULTS

    FAULTS.reset()
    yield FAULTS
    FAULTS.reset()


COMMIT_UNKNOWN, TOO_MANY_WATCHES, UNREADABLE = 1021, 1032, 1036


class TestFDBStandInFaults:
    """Failures a real cluster shows and a healthy stand-in would not: armed in fdb.standin_faults."""

    @pytest.mark.parametrize(("kind", "code", "applied"), [
        ("apply_then_1021", COMMIT_UNKNOWN, True), ("fail_then_1021", COMMIT_UNKNOWN, False),
        ("apply_then_1031", TIMED_OUT, True), ("fail_then_1031", TIMED_OUT, False)])
    def test_commit_faults(self, fdb: Any, db: Any, space: Any, faults: Any, kind: str, code: int,
                           applied: bool) -> None:
        key, other = space.pack(("chosen",)), space.pack(("other",))
        faults.inject(kind, key_contains="chosen")
        db[other] = b"a commit the rule does not match"
        tr = db.create_transaction()
        tr[key] = b"v"
        with pytest.raises(fdb.FDBError) as info:
            tr.commit().wait()
        assert info.value.code == code
        assert db[key].present() == applied and db[other].present()
        db[key] = b"the rule fired once: later commits pass"
        assert faults.stats["injected"] == 1

    def test_transactional_retries_an_applied_commit(self, fdb: Any, db: Any, space: Any, faults: Any) -> None:
        # Why every backend step must be idempotent: the retry runs the function again.
        key = space.pack(("n",))
        faults.inject("apply_then_1021", key_contains="")

        @fdb.transactional
        def increment(tr: Any) -> None:
            tr[key] = (_counter(tr[key]) + 1).to_bytes(8, "little")

        increment(db)
        assert _counter(db[key]) == 2

    def test_reads_can_fail_as_too_old(self, fdb: Any, db: Any, space: Any, faults: Any) -> None:
        faults.inject("read_1007", key_contains="old")
        tr = db.create_transaction()
        tr[space.pack(("fine",))].wait()
        with pytest.raises(fdb.FDBError) as info:
            tr.get_range(space.pack(("old",)), space.pack(("old", None)))
        assert info.value.code == TOO_OLD

    def test_five_second_limit_applies_during_a_long_range_read(self, fdb: Any, db: Any, space: Any,
                                                                 faults: Any, monkeypatch: Any) -> None:
        from fdb import impl

        @fdb.transactional
        def fill(tr: Any) -> None:
            for i in range(200):
                tr[space.pack(("row", i))] = b"x"

        fill(db)
        monkeypatch.setattr(impl, "RANGE_BATCH_ROWS", 10)
        tr = db.create_transaction()
        assert len(list(tr.get_range(space.range().start, space.range().stop))) == 200  # fast: fine
        faults.request_latency = 0.3  # 20 batches: six seconds
        tr = db.create_transaction()
        started = time.monotonic()
        with pytest.raises(fdb.FDBError) as info:
            tr.get_range(space.range().start, space.range().stop)
        assert info.value.code == TOO_OLD and 5 < time.monotonic() - started < 7

    def test_latency_is_added_per_request_and_per_commit(self, fdb: Any, db: Any, space: Any,
                                                         faults: Any) -> None:
        faults.configure(request_latency_ms=20, commit_latency_ms=100)
        started = time.monotonic()
        tr = db.create_transaction()
        for i in range(5):
            tr[space.pack(("k", i))].wait()  # read version + 5 reads
        tr[space.pack(("k",))] = b"v"
        tr.commit().wait()  # one more request, plus the commit latency
        assert 0.24 < time.monotonic() - started < 1.0

    def test_reads_sent_before_any_answer_travel_together(self, fdb: Any, db: Any, space: Any,
                                                          faults: Any) -> None:
        # The real client sends a read at once and answers it later: fifty reads sent before the
        # first is looked at cost one round trip, not fifty.
        @fdb.transactional
        def fill(tr: Any) -> None:
            for i in range(50):
                tr[space.pack(("k", i))] = str(i).encode()

        fill(db)
        faults.configure(request_latency_ms=100)
        tr = db.create_transaction()
        tr[space.pack(("k", 0))] = b"mine"
        tr.add(space.pack(("k", "n")), (2).to_bytes(8, "little"))
        started = time.monotonic()
        sent = [tr[space.pack(("k", i))] for i in range(50)]
        counter = tr[space.pack(("k", "n"))]
        assert [bytes(value) for value in sent] == [b"mine", *(str(i).encode() for i in range(1, 50))]
        assert _counter(counter) == 2 and not tr[space.pack(("k", 99))].present()
        assert time.monotonic() - started < 1.0  # read version and one request for all: 0.2 s
        started = time.monotonic()
        for i in range(5):
            tr[space.pack(("k", i + 10))].wait()  # each waited for before the next is sent
        assert time.monotonic() - started >= 0.5

    def test_reads_in_flight_of_a_reset_transaction_are_cancelled(self, fdb: Any, db: Any,
                                                                  space: Any) -> None:
        tr = db.create_transaction()
        read = tr[space.pack(("k",))]
        tr.on_error(fdb.FDBError(NOT_COMMITTED)).wait()
        with pytest.raises(fdb.FDBError) as info:
            read.present()
        assert info.value.code == 1025

    def test_versionstamped_writes_are_unreadable_in_their_transaction(self, fdb: Any, db: Any,
                                                                       space: Any) -> None:
        tr = db.create_transaction()
        stamped = space.pack_with_versionstamp(("due", 1.0, fdb.tuple.Versionstamp()))
        tr.set_versionstamped_key(stamped, b"")
        tr.set_versionstamped_value(space.pack(("slot",)), stamped)
        could_be = space.pack(("due", 1.0, fdb.tuple.Versionstamp(b"\xfe" * 10)))  # a stamp it may get
        for read in (lambda: tr[space.pack(("slot",))].wait(),
                     lambda: tr[could_be].wait(),
                     lambda: tr.get_range(space.range(("due",)).start, space.range(("due",)).stop),
                     lambda: tr.snapshot.get_range(space.range().start, space.range().stop)):
            with pytest.raises(fdb.FDBError) as info:
                read()
            assert info.value.code == UNREADABLE
        tr.get_range(space.range(("other",)).start, space.range(("other",)).stop)  # elsewhere: fine
        assert not tr[space.pack(("due", 2.0))].present()
        tr[space.pack(("slot",))] = b"overwritten"
        assert bytes(tr[space.pack(("slot",))]) == b"overwritten"

    def test_versionstamped_key_conflicts_with_readers_of_every_later_stamp(self, fdb: Any, db: Any,
                                                                            space: Any) -> None:
        prefix = space.range(("due", 1.0))
        reader = db.create_transaction()
        reader.get_range(prefix.start, prefix.stop)  # sees none; a new stamp there must abort it
        writer = db.create_transaction()
        writer.get_read_version().wait()
        writer.set_versionstamped_key(space.pack_with_versionstamp(("due", 1.0, fdb.tuple.Versionstamp())), b"")
        writer.commit().wait()
        reader[space.pack(("elsewhere",))] = b"x"
        with pytest.raises(fdb.FDBError) as info:
            reader.commit().wait()
        assert info.value.code == NOT_COMMITTED
        # A reader of another due time is untouched: the range ends with that prefix.
        other = db.create_transaction()
        other.get_range(space.range(("due", 2.0)).start, space.range(("due", 2.0)).stop)
        writer = db.create_transaction()
        writer.set_versionstamped_key(space.pack_with_versionstamp(("due", 1.0, fdb.tuple.Versionstamp())), b"")
        writer.commit().wait()
        other[space.pack(("elsewhere",))] = b"y"
        other.commit().wait()

    def test_watches_are_limited_per_database(self, fdb: Any, db: Any, space: Any, faults: Any) -> None:
        faults.watch_limit = 3

        @fdb.transactional
        def arm(tr: Any, n: int) -> Any:
            return tr.watch(space.pack(("w", n)))

        watches = [arm(db, n) for n in range(4)]
        with pytest.raises(fdb.FDBError) as info:
            watches[3].wait()
        assert info.value.code == TOO_MANY_WATCHES and not any(w.is_ready() for w in watches[:3])
        watches[0].cancel()
        again = arm(db, 9)  # a cancelled watch frees its place
        time.sleep(0.1)
        assert not again.is_ready()
        for w in (*watches[1:3], again):
            w.cancel()

    @pytest.mark.parametrize("error", [None, 1009])
    def test_watches_may_fire_with_no_change(self, fdb: Any, db: Any, space: Any, faults: Any,
                                             error: int | None) -> None:
        faults.configure(spurious_watch_rate=1.0, spurious_watch_error=error)
        watch = fdb.transactional(lambda tr: tr.watch(space.pack(("quiet",))))(db)
        fired = threading.Event()
        watch.on_ready(lambda _f: fired.set())
        assert fired.wait(2) and not db[space.pack(("quiet",))].present()
        if error is None:
            watch.wait()
        else:
            with pytest.raises(fdb.FDBError) as info:
                watch.wait()
            assert info.value.code == error


@pytest.mark.parametrize(("client_max", "version", "says"), [
    (710, 710, "The binding requires a library that supports API version 730, but the installed library "
               "supports a maximum version of 710."),
    (800, 800, "Latest known FDB API version is 730"),
    (730, 730, "OK"),
    (730, 710, "OK")])
def test_api_version_is_checked_against_the_client_library(standin_cluster: Any, client_max: int,
                                                           version: int, says: str) -> None:
    import json
    import os
    import subprocess
    import sys

    from fdb_servers import standin_env

    code = ("import fdb\n"
            "try:\n"
            f"    fdb.api_version({version})\n"
            "except RuntimeError as exc:\n"
            "    print(exc)\n"
            "else:\n"
            "    print('OK')\n")
    env = {**os.environ, **standin_env(), "SKUNKQUEUE_FDB_STANDIN": json.dumps({"client_max_api": client_max})}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert says in out.stdout, out.stderr


def test_the_resolver_checks_only_commits_after_the_read_and_collecting_keeps_what_is_readable() -> None:
    """The stand-in's store itself, in this process: what its shortcuts (a bisect over recent commits,
    collecting only keys written twice or cleared) must not change."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "tests" / "fdb_standin" / "standin_server.py"
    spec = importlib.util.spec_from_file_location("standin_server_under_test", path)
    assert spec is not None and spec.loader is not None
    server = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(server)
    store = server.Store()
    key, other = b"k", b"other"
    before = store.read_version()
    store.commit(before, [], [("set", key, b"1")], [])
    after = store.read_version()
    with pytest.raises(server._Refused) as refused:  # read before that commit wrote the key
        store.commit(before, [(key, key + b"\x00")], [("set", other, b"x")], [])
    assert refused.value.args[0] == server.NOT_COMMITTED
    store.commit(after, [(key, key + b"\x00")], [("set", other, b"y")], [])  # read after it: no conflict
    # Collections (one per 200 commits) once the clock has moved past the window: a key set once and
    # one rewritten keep their latest values, a cleared key is forgotten, the window's reads still work.
    store.commit(store.read_version(), [], [("set", b"gone", b"1")], [])
    store.commit(store.read_version(), [], [("clear", b"gone")], [])
    for i in range(300):
        store.commit(store.read_version(), [], [("set", b"counter", str(i).encode())], [])
    old = store.read_version()
    store.started -= 7  # seven seconds later, by the store's clock
    window = store.read_version()
    store.commit(window, [], [("set", b"counter", b"last")], [])
    for _ in range(400):
        store.commit(store.read_version(), [], [("set", b"pad", b"")], [])
    now = store.read_version()
    assert store.get(now, key) == b"1" and store.get(now, other) == b"y"
    assert store.get(window, b"counter") == b"299" and store.get(now, b"counter") == b"last"
    assert b"gone" not in store.history and store.get(now, b"gone") is None
    assert len(store.history[b"counter"]) <= 2 and key not in store.collectable
    assert store.recent_versions == [v for v, _ in store.recent] and store.recent_versions[0] > old
    with pytest.raises(server._Refused):
        store.get(old, b"counter")  # older than the window: too old, as in FoundationDB
