"""The overview's one background reader: shared by all viewers, quiet when nobody watches."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from conftest import Store, redis_servers
from skunkqueue_web.refresher import Refresher
from skunkqueue_web.snapshot import Overview


def test_many_viewers_cost_the_store_one_read_per_interval(sqlite_store: Store) -> None:
    sqlite_store.job("add").fire(1, 1)
    refresher = Refresher(sqlite_store.queue_handle(), interval=0.5, idle_stop=30)
    first = refresher.get()
    assert [r.route for r in first.rows] == ["fast"] and first.rows[0].states["pending"] == 1
    stop = time.monotonic() + 2.0
    answered = []

    def viewer() -> None:  # a tab polling far faster than anyone would
        while time.monotonic() < stop:
            answered.append(refresher.get())
            time.sleep(0.01)

    viewers = [threading.Thread(target=viewer) for _ in range(8)]
    for v in viewers:
        v.start()
    for v in viewers:
        v.join()
    assert len(answered) > 200
    # 2 s at one read per 0.5 s, whatever the number of viewers (and one read to start with).
    assert refresher.reads <= 7, refresher.reads
    # Viewers see new work within an interval or so.
    sqlite_store.job("add").fire(2, 2)
    deadline = time.monotonic() + 5
    while refresher.get().rows[0].states["pending"] != 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_nobody_watching_means_no_reads(sqlite_store: Store) -> None:
    refresher = Refresher(sqlite_store.queue_handle(), interval=0.1, idle_stop=0.5)
    refresher.get()
    time.sleep(1.5)
    reads = refresher.reads
    time.sleep(1.0)
    assert refresher.reads == reads  # the reader stopped
    sqlite_store.job("add").fire(1, 1)
    refresher.get()                  # a new viewer starts it again
    deadline = time.monotonic() + 5
    while not refresher.get().rows:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert refresher.reads > reads


def test_a_store_that_goes_away_keeps_the_last_counts_and_says_so(tmp_path: Path) -> None:
    server = redis_servers.RedisServer(tmp_path / "redis").start()
    try:
        store = Store("redis", server.url, "gone", tmp_path / "runs.txt")
        store.job("add").fire(1, 1)
        refresher = Refresher(store.queue_handle(), interval=0.2, idle_stop=60)
        good = refresher.get()
        assert good.rows[0].states["pending"] == 1
        server.kill()  # SIGKILL: the store is simply gone
        deadline = time.monotonic() + 60
        while refresher.error is None:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert refresher.get().rows == good.rows and refresher.get().taken == good.taken
        # The same server comes back (empty, as it kept nothing): the reader recovers by itself.
        server.process = None
        server.start()
        deadline = time.monotonic() + 60
        while refresher.error is not None or refresher.get().rows:
            assert time.monotonic() < deadline, refresher.error
            time.sleep(0.1)
    finally:
        server.stop()


def test_a_slow_store_is_read_at_most_a_quarter_of_the_time(sqlite_store: Store) -> None:
    class SlowStore(Refresher):
        def _read(self) -> Overview:
            time.sleep(0.3)  # as long as a large queue on a scanning store takes, scaled down
            return super()._read()

    refresher = SlowStore(sqlite_store.queue_handle(), interval=0.1, idle_stop=30)
    refresher.get()
    started, reads = time.monotonic(), refresher.reads
    while time.monotonic() - started < 3.0:
        refresher.get()
        time.sleep(0.05)
    # Back to back this would be 10 reads; 0.3 s reading and 0.9 s pausing allows 3.
    assert 1 <= refresher.reads - reads <= 3, refresher.reads - reads
