"""A fault-injecting TCP proxy for the tests: latency, jitter, bandwidth, resets, blackholes, half-open links.

No maintained tool installs here: toxiproxy is a Go program that neither PyPI
(only old clients, e.g. ``toxiproxy-python``) nor Debian ships, and ``tc netem``
needs CAP_NET_ADMIN and would slow every test sharing the loopback. So this is
a small asyncio proxy, run on a thread of the test process, that a test points
clients at (``proxy.port``) and changes while they run:

- ``latency``/``jitter`` (seconds): each chunk is held that long (+ up to
  ``jitter``) before it is forwarded, in order;
- ``bandwidth`` (bytes per second, per direction and connection);
- :meth:`reset` closes every open connection with a TCP RST on both sides;
- :meth:`blackhole` holds all traffic, and every new connection, for N
  seconds (a partition that heals: TCP delivers what was held, as after
  retransmissions, and nothing is lost or reordered);
- :meth:`half_open` closes the server's side of every open connection and
  leaves the client's open, swallowing whatever it sends: the client sees
  no FIN and no RST, only silence (a peer that vanished);
- :meth:`refuse` makes new connections fail at once (RST on connect).

One proxy per path: a partition of one worker is its own proxy, blackholed,
while the others talk through another proxy or directly.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Faults:
    latency: float = 0.0
    jitter: float = 0.0
    bandwidth: float = 0.0  # bytes per second; 0: unlimited
    refuse: bool = False


@dataclass(eq=False)  # kept in a set, by identity
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    half_open: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN: SO_LINGER with a zero timeout."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class FaultProxy:
    """Forwards ``127.0.0.1:port`` to ``upstream``; faults change while it runs. Use as a context manager."""

    def __init__(self, upstream_host: str, upstream_port: int, *, seed: int | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.faults = Faults()
        self.port = 0
        self.connections_made = 0
        self.resets_sent = 0
        self._random = random.Random(seed)
        self._links: set[_Link] = set()
        self._held_until = 0.0  # monotonic: traffic and connects wait until then (blackhole)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="faultproxy", daemon=True)

    # -- life ----------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for link in list(self._links):
                self._drop(link, rst=False)

        self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _call(self, coroutine: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def _in_loop(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()
        return self._call(run())

    @property
    def open_connections(self) -> int:
        return int(self._in_loop(lambda: sum(1 for link in self._links if not link.half_open)))

    # -- faults ----------------------------------------------------------------------------

    def set(self, **faults: Any) -> None:
        """Change latency, jitter, bandwidth or refuse for all traffic from now on."""
        for name, value in faults.items():
            if not hasattr(self.faults, name):
                raise TypeError(f"no such fault: {name}")
            setattr(self.faults, name, value)

    def clear(self) -> None:
        self.faults = Faults()
        self._held_until = 0.0

    def reset(self) -> int:
        """RST every open connection, both sides; the number reset."""
        def go() -> int:
            links = [link for link in self._links]
            for link in links:
                self._drop(link, rst=True)
            self.resets_sent += len(links)
            return len(links)
        return int(self._in_loop(go))

    def blackhole(self, seconds: float) -> None:
        """Hold every byte, both ways, and every new connection, for ``seconds`` from now."""
        self._held_until = max(self._held_until, time.monotonic() + seconds)

    def half_open(self) -> int:
        """Close the server's side of every open connection, leaving the client's silently open."""
        def go() -> int:
            n = 0
            for link in self._links:
                if not link.half_open and link.server is not None:
                    link.half_open = True
                    link.server.transport.abort()
                    n += 1
            return n
        return int(self._in_loop(go))

    # -- the proxy ---------------------------------------------------------------------------

    async def _hold(self) -> None:
        while (left := self._held_until - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.05))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_made += 1
        if self.faults.refuse:
            _rst(writer)
            return
        link = _Link(client=writer)
        self._links.add(link)
        try:
            await self._hold()
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            self._drop(link, rst=True)
            return
        link.server = up_writer
        link.tasks = [asyncio.ensure_future(self._pipe(link, reader, up_writer, upstream=True)),
                      asyncio.ensure_future(self._pipe(link, up_reader, writer, upstream=False))]

    async def _pipe(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    upstream: bool) -> None:
        release = 0.0  # chunks leave in order: none before the previous one
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                if link.half_open:
                    if upstream:
                        continue  # what the client sends now goes nowhere
                    break
                faults = self.faults
                delay = faults.latency + (self._random.uniform(0, faults.jitter) if faults.jitter else 0.0)
                release = max(release, time.monotonic() + delay)
                if faults.bandwidth:
                    release += len(chunk) / faults.bandwidth
                if (wait := release - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                await self._hold()
                if link.half_open:
                    if upstream:
                        continue
                    break
                writer.write(chunk)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            # Half-open: the server's side is gone, the client's stays open and silent until the
            # client itself gives up and closes it (this pipe, reading from the client, then ends).
            if not link.half_open or upstream:
                self._drop(link, rst=False)

    def _drop(self, link: _Link, *, rst: bool) -> None:
        if link not in self._links:
            return
        self._links.discard(link)
        for side in (link.client, link.server):
            if side is None:
                continue
            if rst:
                _rst(side)
            else:
                side.transport.close()
        for task in link.tasks:
            if task is not asyncio.current_task():
                task.cancel()
