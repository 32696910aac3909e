"""How long work on an event loop's thread holds the loop: the backends' loop-lag tests' measure.

A ticker sleeps 10 ms at a time and records how late it woke, counting only CPU time the
loop's thread spent (on a shared 2-core machine the process is often not scheduled at all,
which says nothing about the loop; a call that blocks without computing is not seen either).
The cyclic garbage collector's passes on that thread are counted apart: a full pass walks
every object the process holds (2,000 waiters' tasks, the application's handles), so its
length is the heap's, not the code under test's. A test bounds the two separately: the
loop's lag without the collector, and the collector's longest pass.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any


class LoopLag:
    """Collects ``lags`` (seconds, per tick, the collector's time taken out) and ``longest_collection``."""

    def __init__(self, every: float = 0.01) -> None:
        self.every = every
        self.lags: list[float] = []
        self.longest_collection = 0.0
        self._collected = 0.0  # the collector's CPU seconds on the loop's thread so far
        self._thread: int | None = None
        self._started: float | None = None

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        if threading.get_ident() != self._thread:
            return  # another thread's pass holds the GIL, not the loop's thread_time
        if phase == "start":
            self._started = time.thread_time()
        elif self._started is not None:
            took = time.thread_time() - self._started
            self._collected += took
            self.longest_collection = max(self.longest_collection, took)
            self._started = None

    async def tick(self, stop: asyncio.Event) -> None:
        """Run on the loop until ``stop`` is set."""
        self._thread = threading.get_ident()
        gc.callbacks.append(self._on_collection)
        try:
            while not stop.is_set():
                started, cpu, collected = time.monotonic(), time.thread_time(), self._collected
                await asyncio.sleep(self.every)
                late = time.monotonic() - started - self.every
                held = time.thread_time() - cpu - (self._collected - collected)
                self.lags.append(min(late, held))
        finally:
            gc.callbacks.remove(self._on_collection)

    def describe(self) -> str:
        ordered = sorted(self.lags)
        p99 = ordered[len(ordered) * 99 // 100] if ordered else 0.0
        return (f"loop lag max {max(ordered, default=0.0) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms "
                f"({len(ordered)} ticks); the collector's longest pass {self.longest_collection * 1000:.1f} ms")
