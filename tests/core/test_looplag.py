"""The loop-lag measure the backends' 2,000-waiter tests use: work on the loop counts, the collector apart."""

from __future__ import annotations

import asyncio
import gc
import time

from skunkqueue.testing.looplag import LoopLag


def _burn(seconds: float) -> None:
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        pass


def _run(work: object) -> LoopLag:
    lag = LoopLag()

    async def go() -> None:
        stop = asyncio.Event()
        tick = asyncio.create_task(lag.tick(stop))
        await asyncio.sleep(0.05)
        asyncio.get_running_loop().call_soon(work)  # type: ignore[arg-type]
        await asyncio.sleep(0.2)
        stop.set()
        await tick

    asyncio.run(go())
    return lag


def test_computing_on_the_loop_is_lag() -> None:
    lag = _run(lambda: _burn(0.08))
    assert max(lag.lags) >= 0.07, lag.describe()


def test_a_collectors_pass_is_counted_apart() -> None:
    garbage = [[i] for i in range(1_000_000)]  # a heap the full pass takes a while to walk
    try:
        lag = _run(gc.collect)
    finally:
        del garbage
    assert lag.longest_collection > 0.03, lag.describe()
    assert max(lag.lags) < lag.longest_collection / 2, lag.describe()
    assert "the collector's longest pass" in lag.describe()
