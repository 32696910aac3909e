"""The MongoDB backend's asyncio side: ``afire`` and ``aresult`` on PyMongo's ``AsyncMongoClient``, with no thread.

Each event loop gets its own client (``skunkqueue.loopclients``), opened from
the same URI with the same options as the sync client (TLS, credentials,
timeouts and retries all come from there); it writes the same documents, with
the same error translation, key handling and clock correction.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Awaitable, Callable, Sequence, TypeVar, cast

from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import BulkWriteError, DocumentTooLarge, DuplicateKeyError, PyMongoError

from skunkqueue.errors import BackendUnavailable, MalformedRecord, PayloadTooLarge
from skunkqueue.loopclients import PerLoop
from skunkqueue.persistence import Persistence
from skunkqueue.record import JobRecord
from skunkqueue_mongo import documents
from skunkqueue_mongo.finishes import FinishPoller, wait

T = TypeVar("T")


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
        clients = self.__dict__.get("_loop_clients")
        if clients is None:  # setdefault: loops in two threads may make their first call at once
            clients = self.__dict__.setdefault("_loop_clients", PerLoop(self._aclient, _aclose))
        client = await cast("PerLoop[Any]", clients).get()
        return client[self.jobs.database.name]["jobs"]

    def _aclient(self) -> Any:
        return AsyncMongoClient(self.conn_url, **self.client_options)

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

        if not records:
            return []
        if any(record.parents for record in records):
            # Workflow steps attach to their parents after the insert: the sync path, on a thread.
            return await super().aenqueue_keyed(records)
        holders = [record.id for record in records]
        docs = documents.docs(records, documents.shift_from(await self._anow()))
        for index in await self._ainsert(docs):
            holders[index] = await self._akey_holder(docs[index])
        return holders

    async def _ainsert(self, docs: list[dict[str, Any]]) -> list[int]:
        """Insert every document; return the positions of those refused because their key is held.

        One whose ``_id`` is stored already was sent again: left as it is (see ``MongoPersistence._insert``).
        """

        jobs = await self._ajobs()
        attempts = 0

        async def insert() -> list[int]:
            nonlocal attempts
            attempts += 1
            try:
                await jobs.insert_many(docs, ordered=False)
                return []
            except BulkWriteError as exc:
                return documents.refused_by_key(exc, attempts)[0]
            except DocumentTooLarge as exc:
                raise PayloadTooLarge(f"A record is too large for a MongoDB document: {exc}") from None

        return await self._acall("enqueue", insert)

    async def _akey_holder(self, doc: dict[str, Any]) -> str:
        """The id of the record holding ``doc``'s key: an existing live one, or ``doc`` once stored."""

        jobs, key = await self._ajobs(), doc["key"]
        for _ in range(documents.KEY_ROUNDS):
            holder = await self._acall("find key holder", partial(
                jobs.find_one, {"queue": self.queue, "key": key}, {"_id": 1, "expire_at": 1}))
            if holder is not None:
                if not documents.holder_expired(holder, await self._anow()):
                    return str(holder["_id"])
                # Expired but not yet swept: the key is free (see MongoPersistence._key_holder).
                await self._acall("drop expired key holder", partial(
                    jobs.delete_one, {"_id": holder["_id"], "queue": self.queue, "key": key,
                                      "expire_at": holder.get("expire_at")}))
            try:
                await self._acall("enqueue", partial(jobs.insert_one, doc))
                return str(doc["_id"])
            except DuplicateKeyError as exc:
                if documents.on_id_index(exc.details):
                    return str(doc["_id"])  # this insert's own first try went in: left as it is
                continue  # someone else took the key (or our own insert went in on a retry): read again
            except DocumentTooLarge as exc:
                raise PayloadTooLarge(f"A record is too large for a MongoDB document: {exc}") from None
        raise BackendUnavailable(f"MongoDB at {self.address}: the key {key!r} of queue {self.queue!r} changed "
                                 f"hands {documents.KEY_ROUNDS} times while enqueueing; try again")

    async def aget(self, job_id: str) -> JobRecord | None:

        jobs, now = await self._ajobs(), await self._anow()
        doc = await self._acall("get", partial(jobs.find_one, {"_id": job_id, "queue": self.queue,
                                                              **documents.not_expired(now)}))
        return None if doc is None else documents.to_record(doc)

    async def await_finished(self, job_id: str, timeout: float | None) -> JobRecord | None:
        """Wait on this loop's one look-out (``finishes``), which reads every awaited record at once."""
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = await self._afinish_poller()
        async with poller.watch(job_id) as slot:
            while not slot.filled:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return await self.aget(job_id)  # the last record seen, unfinished
                slot.event.clear()
                await wait(slot.event, left if left is not None else 60.0)
        if slot.error is not None:
            raise slot.error
        return cast("JobRecord | None", slot.record)

    async def _afinish_poller(self) -> Any:
        """This loop's FinishPoller for this queue (made on the loop's first wait, stopped with the loop)."""
        pollers = self.__dict__.get("_finish_pollers")
        if pollers is None:  # setdefault: loops in two threads may make their first wait at once
            pollers = self.__dict__.setdefault("_finish_pollers", PerLoop(self._new_finish_poller, _astop))
        return await cast("PerLoop[Any]", pollers).get()

    def _new_finish_poller(self) -> Any:
        async def find(ids: list[str], fields: dict[str, int] | None) -> list[dict[str, Any]]:
            jobs = await self._ajobs()
            query = {"_id": {"$in": ids}, "queue": self.queue, **documents.not_expired(await self._anow())}
            return cast("list[dict[str, Any]]",
                        await self._acall("look for finishes", lambda: jobs.find(query, fields).to_list()))

        async def states(ids: list[str]) -> dict[str, Any]:
            return {doc["_id"]: doc.get("state") for doc in await find(ids, {"state": 1})}

        async def records(ids: list[str]) -> dict[str, Any]:
            found: dict[str, Any] = {}
            for doc in await find(ids, None):
                try:
                    found[doc["_id"]] = documents.to_record(doc)
                except MalformedRecord as exc:  # that waiter meets it, as its own aget would
                    found[doc["_id"]] = exc
            return found

        return FinishPoller(states, records)

    async def aget_setting(self, name: str) -> str | None:
        jobs = await self._ajobs()
        settings = jobs.database["settings"]
        doc = await self._acall("get setting", partial(settings.find_one, {"_id": {"q": self.queue, "n": name}}))
        value = None if doc is None else doc.get("value")
        return value if isinstance(value, str) else None

    def close_async_clients(self) -> None:
        for name in ("_finish_pollers", "_loop_clients"):
            held = self.__dict__.pop(name, None)
            if held is not None:
                held.close_all()


async def _aclose(client: Any) -> None:
    await client.close()


async def _astop(poller: Any) -> None:
    await poller.aclose()


__all__ = ["NativeAsync"]
