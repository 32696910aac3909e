"""One event loop's ear for a queue's finishes: a single subscription fanned out to every waiter.

``finish.lua`` publishes each finished id on the queue's done channel (``Keys.done_prefix``).
An ``aresult`` waiter registers here and waits on an ``asyncio.Event``; it holds no connection.
While a loop has waiters, one pub/sub connection of its pool listens for all of them; with
none left, the subscription ends (so an idle producer does not hear every finish of the queue).

A message can be lost (the subscription drops and is made again): each waiter still looks at its
record when it registers (after the subscription is confirmed), whenever the subscription is
made again, and every ``MAX_BLOCK`` seconds, so a finish is never missed, at worst heard late.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator

log = logging.getLogger("skunkqueue.redis")

# Waiters woken (or messages read) per turn of the loop before the listener yields.
WAKE_BATCH = 64
# Longest single server-side block; a longer wait is several blocks, so the
# socket timeout never fires on a healthy connection.
MAX_BLOCK = 5.0


async def wait(event: asyncio.Event, timeout: float) -> None:
    """``event.wait()`` for at most ``timeout`` seconds (then it is set).

    Not ``asyncio.wait_for``: that makes a task per call, a cost thousands of waiters
    woken at once pay in one turn of the loop.
    """
    timer = asyncio.get_running_loop().call_later(max(timeout, 0.0), event.set)
    try:
        await event.wait()
    finally:
        timer.cancel()


class FinishListener:
    """The waiters of one loop and one queue, and the task that listens for them."""

    def __init__(self, client: Any, channel: str) -> None:
        self._client = client
        self._channel = channel
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._ready = asyncio.Event()  # set while the subscription is confirmed
        self._task: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str, ready_within: float) -> AsyncIterator[asyncio.Event]:
        """An event set when ``job_id`` may have finished; look at the record after entering.

        Entering waits (at most ``ready_within`` seconds) for the subscription, so a finish
        after the caller's next look is heard.
        """
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._listen())
            if not self._ready.is_set():  # the subscription's confirmation wakes every waiter
                await wait(event, ready_within)
            yield event
        finally:
            events = self._waiters.get(job_id)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiters[job_id]

    async def _wake_all(self) -> None:
        # A few at a time: each woken waiter reads its record in the loop's next turn, and
        # thousands at once would hold the loop for tens of milliseconds.
        woken = 0
        for events in list(self._waiters.values()):
            for event in list(events):
                event.set()
                woken += 1
                if woken % WAKE_BATCH == 0:
                    await asyncio.sleep(0)

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            # No await between this look and the return: a watch() arriving later starts a new task.
            if not self._waiters:
                self._task = None
                return
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                heard = 0
                while self._waiters:
                    message = await pubsub.get_message(timeout=1.0)
                    heard += 1
                    if heard % WAKE_BATCH == 0:  # a backlog of messages is read without a pause otherwise
                        await asyncio.sleep(0)
                    if message is None:
                        continue
                    if message["type"] == "subscribe":
                        self._ready.set()
                        delay = 0.1
                        await self._wake_all()  # each looks again: a finish before the subscription is not missed
                    elif message["type"] == "message":
                        data = message["data"]
                        job_id = data.decode() if isinstance(data, bytes) else str(data)
                        for event in self._waiters.get(job_id, ()):
                            event.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the connection dropped: waiters look for themselves until it is back
                log.info("the finish subscription on %s failed (%s); subscribing again", self._channel,
                         type(exc).__name__)
                self._ready.clear()
                await self._wake_all()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                self._ready.clear()  # before the await below: a watch() meanwhile waits for a new subscription
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


__all__ = ["FinishListener", "wait"]
