"""One background reader of the overview, shared by every open page and every Prometheus scrape.

Counting a large queue can take the store seconds (Redis's ``counts()`` reads
every record's index entry). Reading it once per refresh interval, whatever
the number of viewers, keeps the store's load independent of how many tabs
are open, and lets every request answer at once from the latest snapshot,
whose time each page shows. The reader stops after a minute without
requests, so an unwatched monitor puts no load on the store, and pauses
three times as long as a read took before the next one, so even a store that
takes a minute to count is kept busy at most a quarter of the time.
"""

from __future__ import annotations

import logging
import threading
import time

from skunkqueue.queue import SkunkQueue
from skunkqueue_web.snapshot import Overview, overview

log = logging.getLogger("skunkqueue.web")

IDLE_STOP = 60.0


class Refresher:
    def __init__(self, queue: SkunkQueue, interval: float, idle_stop: float = IDLE_STOP) -> None:
        self.queue = queue
        self.interval = interval
        self.idle_stop = idle_stop
        self._cond = threading.Condition()
        self._snap: Overview | None = None
        self._error: Exception | None = None
        self._thread: threading.Thread | None = None
        self._wanted = time.monotonic()
        self._poked = threading.Event()
        #: Seconds the last read of the store took (shown on the page and in the benchmark).
        self.last_build = 0.0
        #: How many times the store was read (tests check that viewers do not multiply it).
        self.reads = 0

    def get(self, timeout: float = 120.0) -> Overview:
        """The latest snapshot; waits for the first one. Raises the store's error if there is none."""
        with self._cond:
            self._wanted = time.monotonic()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="skunq-web-refresher", daemon=True)
                self._thread.start()
            deadline = time.monotonic() + timeout
            while self._snap is None and self._error is None and time.monotonic() < deadline:
                self._cond.wait(0.5)
            if self._snap is None:
                raise self._error or TimeoutError("the store did not answer in time")
            return self._snap

    @property
    def error(self) -> Exception | None:
        return self._error

    def poke(self) -> None:
        """Read again now (after an action changed the store)."""
        self._poked.set()

    def _read(self) -> Overview:
        return overview(self.queue)

    def _run(self) -> None:
        while time.monotonic() - self._wanted < self.idle_stop:
            started = time.monotonic()
            try:
                snap = self._read()
                error = None
            except Exception as exc:  # shown on the page; the last good snapshot stays
                log.warning("reading the store failed: %s", exc)
                snap, error = None, exc
            self.last_build = time.monotonic() - started
            self.reads += 1
            with self._cond:
                if snap is not None:
                    self._snap = snap
                self._error = error
                self._cond.notify_all()
            # A slow store (a large queue on a store that scans) is read at most a quarter of the time.
            self._poked.wait(max(self.interval - self.last_build, 3 * self.last_build))
            self._poked.clear()
        self.queue.close()  # this thread's connection
