"""The Redis backend's asyncio side: ``afire`` and ``aresult`` on ``redis.asyncio``, with no thread.

Each event loop gets its own client (``skunkqueue.loopclients``). It reaches
the same server as the sync client, with the same TLS, credentials, timeouts
and retries (``connection.aconnect``), and enqueues through the same Lua scripts.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Awaitable, Callable, Sequence, TypeVar, cast

from redis.exceptions import AuthenticationError, ResponseError

from skunkqueue.errors import MalformedRecord
from skunkqueue.loopclients import PerLoop
from skunkqueue.persistence import Persistence
from skunkqueue.record import JobRecord
from skunkqueue_redis.codec import decode_record, num, text
from skunkqueue_redis.connection import UNREACHABLE, aconnect, translate
from skunkqueue_redis.finishes import MAX_BLOCK, FinishListener, wait

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def aguarded(method: F) -> F:
    """``connection.guarded`` for coroutines: SkunkQueue's errors, without secrets."""

    @functools.wraps(method)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(self, *args, **kwargs)
        except (AuthenticationError, *UNREACHABLE) as exc:
            raise cast(Exception, translate(exc, self.where, self.url)) from None

    return cast(F, wrapper)


class _LoopSide:
    """One event loop's client and scripts."""

    def __init__(self, owner: NativeAsync) -> None:
        self.client = aconnect(owner.url, owner.db, **owner.connect_args)
        self.cluster = owner.cluster
        self.script = owner.scripts_on(self.client)  # same scripts; calling one returns a coroutine
        # The asyncio cluster client has no pub/sub: there, waiters poll (the core's back-off).
        self.finishes = None if owner.cluster else FinishListener(self.client, owner.keys.done_prefix)

    async def aclose(self) -> None:
        if self.finishes is not None:
            await self.finishes.aclose()
        if self.cluster:
            await self.client.aclose()
        else:  # a pool handed to the client is not closed with it unless asked
            await self.client.aclose(close_connection_pool=True)


class NativeAsync(Persistence):
    """Mixed into RedisPersistence: the async producer methods on ``redis.asyncio``.

    Relies on RedisPersistence's ``keys``, ``where``, ``cluster``,
    ``connect_args``, ``scripts_on``, ``enqueue_chunks`` and ``enqueue_chunk``.
    """

    keys: Any
    where: str
    cluster: bool
    connect_args: dict[str, Any]

    wait_replicas: int
    wait_timeout_ms: int

    def replicas_confirmed(self, replies: list[Any], chunks: int) -> list[Any]:
        raise NotImplementedError  # RedisPersistence's

    def enqueue_chunks(self, records: Sequence[JobRecord]) -> list[bytes]:
        raise NotImplementedError  # RedisPersistence's: the sync and async enqueue send the same chunks

    def enqueue_chunk(self) -> int:
        raise NotImplementedError  # RedisPersistence's: records per chunk of enqueue_chunks

    def scripts_on(self, client: Any) -> Any:
        raise NotImplementedError  # RedisPersistence's: its scripts, called through another client

    async def _side(self) -> _LoopSide:
        """This loop's client and scripts (made on the loop's first call, closed when it ends)."""
        sides = self.__dict__.get("_loop_sides")
        if sides is None:  # setdefault: loops in two threads may make their first call at once
            sides = self.__dict__.setdefault("_loop_sides", PerLoop(lambda: _LoopSide(self), _LoopSide.aclose))
        return await cast("PerLoop[_LoopSide]", sides).get()

    async def aenqueue(self, records: Sequence[JobRecord]) -> None:
        await self.aenqueue_keyed(records)

    @aguarded
    async def aenqueue_keyed(self, records: Sequence[JobRecord]) -> list[str]:
        if not records:
            return []
        chunks = self.enqueue_chunks(records)
        if len(chunks) > 1 and self.cluster:
            # All-or-nothing needs MULTI/EXEC on the queue's node, which the
            # asyncio cluster client does not hand out: batches this large take
            # the sync path on the thread (rare, and still off the loop).
            return await super().aenqueue_keyed(records)
        side = await self._side()
        k = self.keys
        ttl, now = num(self.result_ttl), num(time.time())
        if self.wait_replicas:
            # As the sync replicated_enqueue: the enqueue, then WAIT, on one connection.
            pipe = side.client.pipeline(transaction=False)
            if len(chunks) > 1:
                pipe.execute_command("MULTI")
            for chunk in chunks:
                await side.script("enqueue", [k.index, k.lease, k.fired], [ttl, now, chunk], client=pipe)
            if len(chunks) > 1:
                pipe.execute_command("EXEC")
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            return self.holders(records, self.replicas_confirmed(await pipe.execute(), len(chunks)))
        if len(chunks) == 1:
            replies = [await side.script("enqueue", [k.index, k.lease, k.fired], [ttl, now, chunks[0]])]
        else:
            pipe = side.client.pipeline(transaction=True)
            for chunk in chunks:
                await side.script("enqueue", [k.index, k.lease, k.fired], [ttl, now, chunk], client=pipe)
            replies = await pipe.execute()
        return self.holders(records, replies)

    def holders(self, records: Sequence[JobRecord], replies: Sequence[Any]) -> list[str]:
        """Each record's key holder, from the enqueue script's replies (one per chunk)."""
        holders = [record.id for record in records]
        # Each reply lists (position in its chunk, holder) for the records whose key was held.
        for offset, held in zip(range(0, len(records), self.enqueue_chunk()), replies):
            for position, holder in zip(held[::2], held[1::2]):
                holders[offset + int(position) - 1] = text(holder)
        return holders

    @aguarded
    async def aget(self, job_id: str) -> JobRecord | None:
        try:
            flat = await (await self._side()).client.hgetall(self.keys.job(job_id))
        except ResponseError as exc:  # WRONGTYPE: something else lives under the key
            raise MalformedRecord(f"record {job_id!r} is not a hash: {exc}") from None
        return decode_record(cast("dict[bytes, bytes]", flat), job_id) if flat else None

    @aguarded
    async def aget_setting(self, name: str) -> str | None:
        value = await (await self._side()).client.hget(self.keys.settings, name)
        return None if value is None else text(value)

    async def await_finished(self, job_id: str, timeout: float | None) -> JobRecord | None:
        # Not a connection per waiter (BLMOVE on each done list ran the loop's pool dry with a
        # few hundred waiters): the loop's one subscription wakes the waiter (finishes.py). It
        # looks at the record once subscribed, when woken, and every MAX_BLOCK seconds.
        side = await self._side()
        if side.finishes is None:
            return await super().await_finished(job_id, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        async with side.finishes.watch(job_id, MAX_BLOCK if timeout is None else min(MAX_BLOCK, timeout)) as woken:
            while True:
                woken.clear()
                record = await self.aget(job_id)
                if record is None or record.finished_state:
                    return record
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return record
                await wait(woken, MAX_BLOCK if left is None else min(MAX_BLOCK, left))

    def close_async_clients(self) -> None:
        sides = self.__dict__.pop("_loop_sides", None)
        if sides is not None:
            sides.close_all()


__all__ = ["NativeAsync", "aguarded"]
