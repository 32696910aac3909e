"""The MongoDB backend's asyncio side: ``afire`` and ``aresult`` on PyMongo's ``AsyncMongoClient``, with no thread.

An ``AsyncMongoClient`` belongs to the event loop it first ran on, while a
SkunkQueue and its persistence may outlive a loop (``asyncio.run`` per test,
per request in some frameworks). So each loop gets its own client, made on the
first async call in that loop and forgotten with the loop. It is opened from
the same URI with the same options as the sync client (TLS, credentials,
timeouts and retries all come from there) and writes the same documents, with
the same error translation, key handling and clock correction.
"""

from __future__ import annotations

import time
import weakref
from functools import partial
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

from pymongo.errors import BulkWriteError, DocumentTooLarge, DuplicateKeyError, PyMongoError

from skunkqueue.errors import BackendUnavailable, PayloadTooLarge
from skunkqueue.persistence import Persistence
from skunkqueue.record import JobRecord

if TYPE_CHECKING:
    import asyncio

    from pymongo.asynchronous.collection import AsyncCollection

T = TypeVar("T")


class _LoopSide:
    """One event loop's client, closed when the loop shuts down (see skunkqueue_redis.aio._LoopSide)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def watch_loop_end(self) -> None:
        # asyncio.run finalizes the async generators its loop tracks: this one closes the client.
        self.guard = self._until_loop_ends()
        await self.guard.__anext__()

    async def _until_loop_ends(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self.client.close()


class NativeAsync(Persistence):
    """Mixed into MongoPersistence: the async producer methods on ``AsyncMongoClient``.

    Relies on MongoPersistence's ``conn_url``, ``client_options``, ``jobs``,
    ``_retry_or_raise``, ``_clock_is_fresh``, ``_set_clock`` and ``now``.
    """

    conn_url: str
    address: str
    client_options: dict[str, Any]
    jobs: Any

    def _retry_or_raise(self, what: str, exc: PyMongoError, *, last: bool) -> None:
        raise NotImplementedError

    def _clock_is_fresh(self) -> bool:
        raise NotImplementedError

    def _set_clock(self, hello: Any, sent: float) -> tuple[float, float]:
        raise NotImplementedError

    async def _ajobs(self) -> AsyncCollection[dict[str, Any]]:
        """This loop's ``jobs`` collection (its client is made on the loop's first call)."""
        import asyncio

        from pymongo import AsyncMongoClient

        loop = asyncio.get_running_loop()
        sides: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopSide]
        # setdefault: loops in two threads may make their first call at once (one dict, not two).
        sides = self.__dict__.setdefault("_loop_sides", weakref.WeakKeyDictionary())
        side = sides.get(loop)
        if side is None:
            side = sides[loop] = _LoopSide(AsyncMongoClient(self.conn_url, **self.client_options))
            await side.watch_loop_end()
        return side.client[self.jobs.database.name]["jobs"]

    async def _acall(self, what: str, op: Callable[[], Awaitable[T]], *, idempotent: bool = True) -> T:
        """``_call`` for coroutines: same retry and the same errors."""
        for attempt in (1, 2):
            try:
                return await op()
            except PyMongoError as exc:
                self._retry_or_raise(what, exc, last=not idempotent or attempt == 2)
        raise AssertionError("unreachable")

    async def _anow(self) -> float:
        """``now`` without blocking the loop: the kept estimate, renewed with an async ``hello`` when stale."""
        if not self._clock_is_fresh():
            jobs = await self._ajobs()
            sent = time.monotonic()
            hello = await self._acall("clock", lambda: jobs.database.client.admin.command("hello"))
            self._set_clock(hello, sent)
        return self.now()  # fresh now: no round trip

    # -- producers -------------------------------------------------------------------

    async def aenqueue(self, records: Sequence[JobRecord]) -> None:
        await self.aenqueue_keyed(records)

    async def aenqueue_keyed(self, records: Sequence[JobRecord]) -> list[str]:
        from skunkqueue_mongo.persistence import _docs, _shift_from

        if not records:
            return []
        holders = [record.id for record in records]
        docs = _docs(records, _shift_from(await self._anow()))
        for index in await self._ainsert(docs):
            holders[index] = await self._akey_holder(docs[index])
        return holders

    async def _ainsert(self, docs: list[dict[str, Any]]) -> list[int]:
        """Insert every document; return the positions of those refused because their key is held."""
        from skunkqueue_mongo.persistence import _refused_by_key

        jobs = await self._ajobs()
        attempts = 0

        async def insert() -> list[int]:
            nonlocal attempts
            attempts += 1
            try:
                await jobs.insert_many(docs, ordered=False)
                return []
            except BulkWriteError as exc:
                return _refused_by_key(exc, attempts)
            except DocumentTooLarge as exc:
                raise PayloadTooLarge(f"A record is too large for a MongoDB document: {exc}") from None

        return await self._acall("enqueue", insert)

    async def _akey_holder(self, doc: dict[str, Any]) -> str:
        """The id of the record holding ``doc``'s key: an existing live one, or ``doc`` once stored."""
        from skunkqueue_mongo.persistence import KEY_ROUNDS, _holder_expired

        jobs, key = await self._ajobs(), doc["key"]
        for _ in range(KEY_ROUNDS):
            holder = await self._acall("find key holder", partial(
                jobs.find_one, {"queue": self.queue, "key": key}, {"_id": 1, "expire_at": 1}))
            if holder is not None:
                if not _holder_expired(holder, await self._anow()):
                    return str(holder["_id"])
                # Expired but not yet swept: the key is free (see MongoPersistence._key_holder).
                await self._acall("drop expired key holder", partial(
                    jobs.delete_one, {"_id": holder["_id"], "queue": self.queue, "key": key,
                                      "expire_at": holder.get("expire_at")}))
            try:
                await self._acall("enqueue", partial(jobs.insert_one, doc))
                return str(doc["_id"])
            except DuplicateKeyError:
                continue  # someone else took the key (or our own insert went in on a retry): read again
            except DocumentTooLarge as exc:
                raise PayloadTooLarge(f"A record is too large for a MongoDB document: {exc}") from None
        raise BackendUnavailable(f"MongoDB at {self.address}: the key {key!r} of queue {self.queue!r} changed "
                                 f"hands {KEY_ROUNDS} times while enqueueing; try again")

    async def aget(self, job_id: str) -> JobRecord | None:
        from skunkqueue_mongo.persistence import _not_expired, _to_record

        jobs, now = await self._ajobs(), await self._anow()
        doc = await self._acall("get", partial(jobs.find_one, {"_id": job_id, "queue": self.queue,
                                                              **_not_expired(now)}))
        return None if doc is None else _to_record(doc)

    def close_async_clients(self) -> None:
        """Let each live loop close its client; a closed loop already took its sockets down."""
        sides = self.__dict__.pop("_loop_sides", None)
        for loop, side in list((sides or {}).items()):
            if not loop.is_closed():
                _close_on(loop, side.guard.aclose)  # runs its finally: the client's close(), once


def _close_on(loop: asyncio.AbstractEventLoop, aclose: Callable[[], Awaitable[Any]]) -> None:
    def start() -> None:
        loop.create_task(aclose())  # type: ignore[arg-type]

    try:
        loop.call_soon_threadsafe(start)
    except RuntimeError:  # closed meanwhile
        pass


__all__ = ["NativeAsync"]
