"""A store client per event loop, for backends with a native asyncio client.

An asyncio client (``redis.asyncio``, PyMongo's ``AsyncMongoClient``) belongs
to the event loop it first ran on, while a SkunkQueue and its persistence may
outlive a loop (``asyncio.run`` per test, per request in some frameworks) or
serve loops in several threads. So each loop gets its own client, made on the
first async call in that loop, closed when that loop shuts down, and forgotten
with the loop.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, AsyncGenerator, Awaitable, Callable, Generic, TypeVar

if TYPE_CHECKING:  # imported where used: a worker of sync jobs never pays for asyncio
    import asyncio

C = TypeVar("C")


class _Held(Generic[C]):
    """One loop's client, with the async generator that closes it when the loop shuts down."""

    def __init__(self, client: C, close: Callable[[C], Awaitable[object]]) -> None:
        self.client = client
        self._close = close
        self.guard = self._until_loop_ends()

    async def _until_loop_ends(self) -> AsyncGenerator[None, None]:
        # asyncio.run (anything calling loop.shutdown_asyncgens()) finalizes the async
        # generators its loop tracks: this one, kept alive until then, closes the client
        # in its finally. Without it, a loop that ends before close_all() would leave
        # the client's sockets to the garbage collector.
        try:
            yield
        finally:
            await self._close(self.client)


class PerLoop(Generic[C]):
    """``make()`` a client on each loop's first :meth:`get`; ``close(client)`` it when that loop ends."""

    def __init__(self, make: Callable[[], C], close: Callable[[C], Awaitable[object]]) -> None:
        self._make = make
        self._close = close
        self._held: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Held[C]] = weakref.WeakKeyDictionary()

    async def get(self) -> C:
        """The running loop's client."""
        import asyncio

        loop = asyncio.get_running_loop()
        held = self._held.get(loop)
        if held is None:
            held = self._held[loop] = _Held(self._make(), self._close)
            await held.guard.__anext__()  # the loop tracks the generator from here on
        return held.client

    def close_all(self) -> None:
        """Have each live loop close its client (soon, on that loop); a closed loop already did."""
        held, self._held = self._held, weakref.WeakKeyDictionary()
        for loop, one in list(held.items()):
            if not loop.is_closed():
                _close_on(loop, one.guard.aclose)  # runs its finally: close(client), once


def _close_on(loop: asyncio.AbstractEventLoop, aclose: Callable[[], Awaitable[object]]) -> None:
    def start() -> None:
        loop.create_task(aclose())  # type: ignore[arg-type]

    try:
        loop.call_soon_threadsafe(start)
    except RuntimeError:  # closed meanwhile
        pass
