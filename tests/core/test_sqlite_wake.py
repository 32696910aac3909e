"""The SQLite backend's wake-ups through FIFOs beside the queue file, attacked.

A poke is only a hint: whatever happens to the folder or the FIFOs in it, producers
must not fail or block, every job must still be claimed exactly once, and a waiter
must at worst fall back to polling.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from skunkqueue.persistence import NOTIFY_LATENCY
from skunkqueue.persistence.sqlite import SQLitePersistence
from skunkqueue.testing.suite_support import make_record, wait_until

# Every test here bounds a wake-up in milliseconds: they run alone, after the parallel run.
pytestmark = pytest.mark.serial

NOBODY = 65534
SLACK = 0.3  # for a busy 2-core test machine


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "queue.db"


@pytest.fixture
def open_store(db: Path) -> Iterator[Callable[..., SQLitePersistence]]:
    stores: list[SQLitePersistence] = []

    def opener(path: Path = db) -> SQLitePersistence:
        stores.append(SQLitePersistence("q", url=str(path)))
        return stores[-1]

    yield opener
    for store in stores:
        store.close()


def fifos(db: Path) -> list[str]:
    found = []
    try:
        entries = list(os.scandir(str(db) + "-wake"))
    except FileNotFoundError:
        return []
    for entry in entries:
        try:
            if stat.S_ISFIFO(entry.stat(follow_symlinks=False).st_mode) and not entry.name.startswith("."):
                found.append(entry.name)
        except FileNotFoundError:
            continue  # a waiter came and went
    return sorted(found)


def wait_in_thread(store: SQLitePersistence, route: str = "r", worker: str = "w",
                   timeout: float = 5.0) -> tuple[threading.Thread, list[float]]:
    """A waiter that has been idle for a minute; ``returned`` gets the time it woke."""
    returned: list[float] = []

    def run() -> None:
        store.wait_for_work(route, worker, timeout, 60.0)
        returned.append(time.monotonic())

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(lambda: any(n.startswith("w") for n in fifos(store.path)), 5, "the waiter's FIFO")
    return thread, returned


def test_a_poke_wakes_the_waiter_well_before_its_polling_pause(open_store: Callable[..., SQLitePersistence],
                                                              db: Path) -> None:
    waiter, producer = open_store(), open_store()
    assert waiter.notifies
    waiter.max_idle_poll = 5.0  # type: ignore[misc]  # nothing but the poke can wake it in time
    thread, returned = wait_in_thread(waiter)
    producer.enqueue([make_record("q")])
    stored = time.monotonic()
    thread.join()
    assert returned[0] - stored < NOTIFY_LATENCY + SLACK
    assert fifos(db) == []  # the waiter took its FIFO with it


def test_the_fifo_exists_before_the_look_so_work_stored_just_before_the_wait_is_not_missed(
        open_store: Callable[..., SQLitePersistence]) -> None:
    waiter, producer = open_store(), open_store()
    producer.enqueue([make_record("q")])
    started = time.monotonic()
    waiter.wait_for_work("r", "w", 5.0, 60.0)  # no poke will come: the look must see the record
    assert time.monotonic() - started < 0.1


def test_a_waiter_wakes_when_a_future_record_falls_due(open_store: Callable[..., SQLitePersistence]) -> None:
    waiter, producer = open_store(), open_store()
    producer.enqueue([make_record("q", due=time.time() + 0.15)])
    started = time.monotonic()
    waiter.wait_for_work("r", "w", 5.0, 60.0)
    assert 0.1 < time.monotonic() - started < 0.15 + SLACK


def test_a_record_for_another_route_or_worker_pokes_nobody_here(open_store: Callable[..., SQLitePersistence]) -> None:
    waiter, producer = open_store(), open_store()
    thread, returned = wait_in_thread(waiter, timeout=0.15)
    producer.enqueue([make_record("q", "other"), make_record("q", target="someone-else")])
    started = time.monotonic()
    thread.join()
    assert returned[0] - started > 0.05  # it slept on until its timeout


def test_a_killed_waiter_leaves_a_fifo_that_does_not_block_or_break_producers(
        open_store: Callable[..., SQLitePersistence], db: Path) -> None:
    open_store()  # makes the file and the folder
    code = ("import sys; from skunkqueue.persistence.sqlite import SQLitePersistence as S\n"
            "s = S('q', url=sys.argv[1])\n"
            "while True: s.wait_for_work('r', 'w', 60.0, 60.0)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(db)])
    try:
        wait_until(lambda: fifos(db), 15, "the child's FIFO")
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    stale = fifos(db)
    if not stale:
        pytest.skip("the child was killed between two waits")  # its FIFO is only there while it waits
    producer = open_store()
    started = time.monotonic()
    producer.enqueue([make_record("q")])
    assert time.monotonic() - started < 1.0
    assert fifos(db) == []  # the producer found nobody reading it and removed it
    # A live waiter beside the dead one's leftovers is still woken.
    waiter = open_store()
    assert waiter.claim("r", "w", 10)
    thread, returned = wait_in_thread(waiter)
    producer.enqueue([make_record("q")])
    stored = time.monotonic()
    thread.join()
    assert returned[0] - stored < NOTIFY_LATENCY + SLACK


def test_planted_files_and_symlinks_are_never_written(open_store: Callable[..., SQLitePersistence], db: Path,
                                                     tmp_path: Path) -> None:
    waiter, producer = open_store(), open_store()
    prefix = f"{waiter._route_tag('r')}."
    folder = Path(str(db) + "-wake")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (folder / f"{prefix}planted.1.0").write_bytes(b"file")
    os.symlink(victim, folder / f"{prefix}link.1.0")
    for _ in range(3):
        producer.enqueue([make_record("q")])
    assert victim.read_bytes() == b"precious"
    assert (folder / f"{prefix}planted.1.0").read_bytes() == b"file"
    assert len(waiter.claim("r", "w", 30, 10)) == 3


def test_fifty_idle_waiters_each_record_claimed_once_and_producers_stay_quick(
        open_store: Callable[..., SQLitePersistence], db: Path) -> None:
    producer = open_store()
    stores = [open_store() for _ in range(50)]
    claimed: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker(store: SQLitePersistence, n: int) -> None:
        idle_since = time.monotonic()
        while not stop.is_set():
            got = store.claim("r", f"w{n}", 30)
            if got:
                with lock:
                    claimed.extend(r.id for r in got)
                idle_since = time.monotonic()
                continue
            store.wait_for_work("r", f"w{n}", 1.0, time.monotonic() - idle_since)

    threads = [threading.Thread(target=worker, args=(s, n)) for n, s in enumerate(stores)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(fifos(db)) >= 40, 30, "most waiters waiting")
        records = [make_record("q") for _ in range(100)]
        slowest = 0.0
        for record in records:
            started = time.monotonic()
            producer.enqueue([record])
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.005)
        wait_until(lambda: len(claimed) >= len(records), 30, "every record claimed")
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert sorted(claimed) == sorted(r.id for r in records)  # each exactly once
    assert slowest < 0.5, f"an enqueue took {slowest * 1000:.0f} ms beside 50 waiters"


def test_a_result_waiter_is_woken_by_the_finish(open_store: Callable[..., SQLitePersistence], db: Path) -> None:
    from skunkqueue import policy

    producer, worker = open_store(), open_store()
    record = make_record("q")
    producer.enqueue([record])
    [claimed] = worker.claim("r", "w", 30)
    producer.max_idle_poll = 5.0  # type: ignore[misc]  # nothing but the poke can wake it in time
    finished_at: list[float] = []

    def finish() -> None:
        wait_until(lambda: any(n.startswith("d") for n in fifos(db)), 5, "the result waiter's FIFO")
        worker.finish(claimed.id, claimed.token, policy.completed(b"42"))
        finished_at.append(time.monotonic())

    thread = threading.Thread(target=finish)
    thread.start()
    done = producer.wait_finished(record.id, 10)
    woke = time.monotonic()
    thread.join()
    assert done is not None and done.finished_state
    assert woke - finished_at[0] < NOTIFY_LATENCY + SLACK


def test_no_folder_to_be_had_means_polling_that_still_works(tmp_path: Path,
                                                            open_store: Callable[..., SQLitePersistence]) -> None:
    db = tmp_path / "blocked.db"
    Path(str(db) + "-wake").write_text("a file where the folder would go")
    waiter, producer = open_store(db), open_store(db)
    assert not waiter.notifies
    producer.enqueue([make_record("q")])
    waiter.wait_for_work("r", "w", 5.0, 60.0)
    assert len(waiter.claim("r", "w", 10)) == 1
    started = time.monotonic()
    waiter.wait_for_work("r", "w", 5.0, 60.0)
    assert time.monotonic() - started < waiter.max_idle_poll + SLACK  # the polling back-off, not the timeout


def _as_nobody(work: Callable[[], object]) -> int:
    """Run ``work`` in a forked child that dropped to user nobody; its exit status (0: it returned)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.umask(0o077)
            work()
            status = 0
        except BaseException as exc:
            print(f"as nobody: {exc!r}", file=sys.stderr)
        finally:
            os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                                reason="switching users needs root")


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    # pytest's own folders are 0700 all the way up; another user needs a way in.
    folder = Path(tempfile.mkdtemp(prefix="skunq-shared-", dir="/tmp"))
    folder.chmod(0o777)
    yield folder
    folder.chmod(0o777)
    shutil.rmtree(folder)


@needs_root
def test_a_producer_of_another_user_with_umask_077_wakes_a_waiter(shared_dir: Path) -> None:
    db = shared_dir / "queue.db"
    waiter = SQLitePersistence("q", url=str(db))
    try:
        for path in (db, Path(str(db) + "-wal"), Path(str(db) + "-shm")):
            path.chmod(0o666)  # a queue file every user of the host may write
        waiter.close()
        os.rmdir(str(db) + "-wake")
        # The folder is made by the other user, under umask 077: its mode must follow the file's.
        assert _as_nobody(lambda: SQLitePersistence("q", url=str(db)).close()) == 0
        folder = Path(str(db) + "-wake")
        assert folder.stat().st_uid == NOBODY
        assert stat.S_IMODE(folder.stat().st_mode) == 0o1777
        waiter = SQLitePersistence("q", url=str(db))
        waiter.max_idle_poll = 5.0  # type: ignore[misc]
        thread, returned = wait_in_thread(waiter)
        assert stat.S_IMODE(os.lstat(folder / fifos(db)[0]).st_mode) == 0o622
        def produce() -> None:
            SQLitePersistence("q", url=str(db)).enqueue([make_record("q")])

        started = time.monotonic()
        assert _as_nobody(produce) == 0
        thread.join()
        assert returned[0] - started < 0.5 + SLACK  # fork and open included; the poll would take 5 s
    finally:
        waiter.close()


@needs_root
def test_a_store_in_a_folder_where_the_user_may_not_write_polls(shared_dir: Path) -> None:
    db = shared_dir / "queue.db"
    keeper = SQLitePersistence("q", url=str(db))  # keeps the -wal and -shm files in place
    try:
        for path in (db, Path(str(db) + "-wal"), Path(str(db) + "-shm")):
            path.chmod(0o666)
        keeper.close()
        keeper = SQLitePersistence("q", url=str(db))
        os.rmdir(str(db) + "-wake")
        shared_dir.chmod(0o755)  # nobody may write the file, but not make anything beside it

        def work() -> None:
            store = SQLitePersistence("q", url=str(db))
            assert not store.notifies
            store.enqueue([make_record("q")])
            store.wait_for_work("r", "w", 5.0, 60.0)
            assert len(store.claim("r", "w", 10)) == 1
            started = time.monotonic()
            store.wait_for_work("r", "w", 5.0, 60.0)
            assert time.monotonic() - started < store.max_idle_poll + SLACK

        assert _as_nobody(work) == 0
        assert not Path(str(db) + "-wake").exists()
    finally:
        shared_dir.chmod(0o777)
        keeper.close()


def test_a_write_waits_for_the_lock_in_short_steps_and_gives_up_after_the_timeout(
        open_store: Callable[..., SQLitePersistence], db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    from skunkqueue.persistence import sqlite as sqlite_backend

    store = open_store()
    holder = sqlite3.connect(str(db), isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another process's write, in the middle of its transaction
    threading.Timer(0.2, lambda: holder.execute("COMMIT")).start()
    started = time.monotonic()
    store.enqueue([make_record("q")])
    waited = time.monotonic() - started
    assert 0.15 < waited < 0.2 + SLACK  # it waited, and got the lock soon after it was free
    assert store._db.execute("PRAGMA busy_timeout").fetchone()[0] == 30000  # reads keep their handler

    monkeypatch.setattr(sqlite_backend, "LOCK_TIMEOUT", 0.2)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            store.enqueue([make_record("q")])
    finally:
        holder.execute("COMMIT")
        holder.close()
    assert store._db.execute("PRAGMA busy_timeout").fetchone()[0] == 30000
    assert len(store.claim("r", "w", 30, 10)) == 1  # the refused record was not stored
