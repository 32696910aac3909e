"""One event loop's look-out for finished records: every awaited id read in one query per round.

MongoDB has no pub/sub for a standalone server, and a change stream per waiter would cost a
cursor each. So an ``aresult`` waiter registers its id here and waits on an ``asyncio.Event``;
while a loop has waiters, one task reads the state of all their records with ``$in`` (in chunks
of ``CHUNK``) and sets the events of those that finished or are gone. The waiter then reads its
record itself. Before this, each of 2,000 waiters polled its own record: ~20,000 reads a second
on one loop and a loop lag of 60-180 ms.

Rounds follow each other quickly after a waiter arrives (``FIRST_PAUSE``) and slow down, doubling,
to ``MAX_PAUSE`` while nothing finishes: a finish is seen at most ``MAX_PAUSE`` plus one round late.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncIterator, Awaitable, Callable

from skunkqueue.record import FINISHED_STATES

FIRST_PAUSE = 0.002
MAX_PAUSE = 0.05
# Ids per query: a $in of 1,000 short strings is ~30 KB, far under the 16 MB command limit.
CHUNK = 1000
# Events set per turn of the loop before the poller yields, so thousands woken at once do not stall it.
WAKE_BATCH = 64


async def wait(event: asyncio.Event, timeout: float) -> None:
    """``event.wait()`` for at most ``timeout`` seconds (then it is set); no task per call."""
    timer = asyncio.get_running_loop().call_later(max(timeout, 0.0), event.set)
    try:
        await event.wait()
    finally:
        timer.cancel()


class Slot:
    """One waiter's place: ``filled`` once ``record`` (finished, or None: gone) or ``error`` is there,
    and ``event`` set then (``wait`` also sets it when its time is up)."""

    __slots__ = ("event", "filled", "record", "error")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.filled = False
        self.record: Any = None
        self.error: BaseException | None = None


class FinishPoller:
    """The waiters of one loop and one queue, and the task that looks at their records.

    ``states(ids)`` gives {id: state} for the live records among ids (a missing id is gone or
    expired); ``records(ids)`` gives {id: JobRecord, or the error reading it} for those ids.
    Neither is called per waiter.
    """

    def __init__(self, states: Callable[[list[str]], Awaitable[dict[str, Any]]],
                 records: Callable[[list[str]], Awaitable[dict[str, Any]]]) -> None:
        self._states = states
        self._records = records
        self._waiters: dict[str, set[Slot]] = {}
        self._task: asyncio.Task[None] | None = None
        self._pause = FIRST_PAUSE

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str) -> AsyncIterator[Slot]:
        """A slot filled once ``job_id``'s record is finished or gone (or the look-out failed)."""
        slot = Slot()
        self._waiters.setdefault(job_id, set()).add(slot)
        self._pause = FIRST_PAUSE
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        try:
            yield slot
        finally:
            slots = self._waiters.get(job_id)
            if slots is not None:
                slots.discard(slot)
                if not slots:
                    del self._waiters[job_id]

    async def _run(self) -> None:
        first = True
        while self._waiters:
            if not first:
                await asyncio.sleep(self._pause)
                self._pause = min(self._pause * 2, MAX_PAUSE)
            first = False
            await asyncio.sleep(0)  # let the waiters that arrive in this turn of the loop join the round
            ids = list(self._waiters)
            filled: dict[str, Any] = {}
            error: BaseException | None = None
            try:
                for start in range(0, len(ids), CHUNK):
                    chunk = ids[start:start + CHUNK]
                    states = await self._states(chunk)
                    finished = [i for i in chunk if states.get(i) in FINISHED_STATES]
                    filled.update((i, None) for i in chunk if i not in states)  # gone: expired or purged
                    if finished:
                        filled.update(await self._records(finished))
            except Exception as exc:  # every waiter meets the error, as its own look would have
                error = exc
            woken = 0
            for job_id in ids if error is not None else filled:
                value = filled.get(job_id)
                for slot in list(self._waiters.get(job_id, ())):
                    if isinstance(value, BaseException):
                        slot.error = value
                    else:
                        slot.record, slot.error = value, error
                    slot.filled = True
                    slot.event.set()
                    woken += 1
                    if woken % WAKE_BATCH == 0:
                        await asyncio.sleep(0)
        self._task = None

    async def aclose(self) -> None:
        """Stop the look-out (its loop is ending: ``skunkqueue.loopclients.PerLoop`` calls this)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
