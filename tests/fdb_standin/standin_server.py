"""A STAND-IN for a FoundationDB cluster, for SkunkQueue's tests. It is not FoundationDB.

No fdbserver or libfdb_c can be installed where these tests run, yet the
conformance kit starts real worker processes that must share one database. So
this small server keeps a multi-version key-value map in memory and resolves
commits the way FoundationDB's resolver does: a transaction is rejected with
1020 (not_committed) if any key range it read without ``snapshot`` was written
by a transaction that committed after its read version. It speaks a
length-prefixed pickle protocol on loopback to the client in ``fdb/`` (the
shadowing ``fdb`` package); pickle is acceptable only because both ends are
this test suite on the same machine.

Run: ``python standin_server.py`` prints ``PORT`` on its first stdout line.
"""

from __future__ import annotations

import bisect
import pickle
import select
import socket
import socketserver
import struct
import sys
import threading
import time
from typing import Any

# FoundationDB versions advance about a million per second; a read version
# older than five seconds' worth can no longer be read from or committed.
VERSIONS_PER_SECOND = 1_000_000
MVCC_WINDOW = 5 * VERSIONS_PER_SECOND

NOT_COMMITTED = 1020
TRANSACTION_TOO_OLD = 1007

_HEADER = struct.Struct(">I")


def _next_key(key: bytes) -> bytes:
    return key + b"\x00"


def _overlaps(a: tuple[bytes, bytes], b: tuple[bytes, bytes]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


class Store:
    """The versioned map, the conflict history and the watch condition."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.keys: list[bytes] = []                       # every key with history, sorted
        self.history: dict[bytes, list[tuple[int, bytes | None]]] = {}
        self.version = 0
        self.started = time.monotonic()
        # (commit version, write conflict ranges) of recent commits, oldest first, and their versions
        # alone (for bisect: a commit checks only those newer than its read version).
        self.recent: list[tuple[int, list[tuple[bytes, bytes]]]] = []
        self.recent_versions: list[int] = []
        # Keys whose history _collect may shorten: written more than once, or cleared. A key set
        # once keeps its one entry for ever, so collecting need not look at it.
        self.collectable: set[bytes] = set()
        self.commits = 0

    def _clock(self) -> int:
        return int((time.monotonic() - self.started) * VERSIONS_PER_SECOND)

    # -- reads (callers hold the lock) -----------------------------------------------

    def _value_at(self, key: bytes, version: int) -> bytes | None:
        for v, value in reversed(self.history.get(key, ())):
            if v <= version:
                return value
        return None

    def _latest(self, key: bytes) -> bytes | None:
        entries = self.history.get(key)
        return entries[-1][1] if entries else None

    def _check_age(self, version: int) -> None:
        if self._clock() - version > MVCC_WINDOW:
            raise _Refused(TRANSACTION_TOO_OLD)

    def read_version(self) -> int:
        with self.cond:
            # Handing out a version moves the clock, so every later commit is newer.
            self.version = max(self.version, self._clock())
            return self.version

    def get(self, version: int, key: bytes) -> bytes | None:
        with self.cond:
            self._check_age(version)
            return self._value_at(key, version)

    def get_many(self, version: int, keys: list[bytes]) -> list[bytes | None]:
        with self.cond:
            self._check_age(version)
            return [self._value_at(key, version) for key in keys]

    def get_range(self, version: int, begin: bytes, end: bytes, limit: int,
                  reverse: bool) -> list[tuple[bytes, bytes]]:
        with self.cond:
            self._check_age(version)
            lo, hi = bisect.bisect_left(self.keys, begin), bisect.bisect_left(self.keys, end)
            indexes = range(hi - 1, lo - 1, -1) if reverse else range(lo, hi)
            out = []
            for i in indexes:
                value = self._value_at(self.keys[i], version)
                if value is not None:
                    out.append((self.keys[i], value))
                    if limit and len(out) >= limit:
                        break
            return out

    # -- commits ------------------------------------------------------------------------

    def commit(self, read_version: int, reads: list[tuple[bytes, bytes]],
               mutations: list[tuple[Any, ...]], writes: list[tuple[bytes, bytes]]) -> tuple[int, bytes]:
        with self.cond:
            self._check_age(read_version)
            newer = bisect.bisect_right(self.recent_versions, read_version)
            for _, ranges in self.recent[newer:]:
                if any(_overlaps(r, w) for r in reads for w in ranges):
                    raise _Refused(NOT_COMMITTED)
            version = self.version = max(self.version + 1, self._clock())
            stamp = struct.pack(">QH", version, 0)  # 8-byte commit version, 2-byte batch order
            written = list(writes)
            for op, *args in mutations:
                if op == "set":
                    self._put(version, args[0], args[1])
                    written.append((args[0], _next_key(args[0])))
                elif op == "clear":
                    self._put(version, args[0], None)
                    written.append((args[0], _next_key(args[0])))
                elif op == "clear_range":
                    begin, end = args
                    for key in self.keys[bisect.bisect_left(self.keys, begin):bisect.bisect_left(self.keys, end)]:
                        if self._latest(key) is not None:
                            self._put(version, key, None)
                    written.append((begin, end))
                elif op == "add":
                    key, param = args
                    old = self._latest(key) or b""
                    total = int.from_bytes(old[:len(param)].ljust(len(param), b"\x00"), "little") + \
                        int.from_bytes(param, "little")
                    self._put(version, key, (total % (1 << (8 * len(param)))).to_bytes(len(param), "little"))
                    written.append((key, _next_key(key)))
                elif op in ("versionstamped_key", "versionstamped_value"):
                    key, value = args
                    if op == "versionstamped_key":
                        key = _stamp(key, stamp)
                    else:
                        value = _stamp(value, stamp)
                    self._put(version, key, value)
                    written.append((key, _next_key(key)))
                else:
                    raise ValueError(f"stand-in: unknown mutation {op!r}")
            self.recent.append((version, written))
            self.recent_versions.append(version)
            self.commits += 1
            if self.commits % 200 == 0:
                self._collect(version)
            self.cond.notify_all()
            return version, stamp

    def _put(self, version: int, key: bytes, value: bytes | None) -> None:
        entries = self.history.get(key)
        if entries is None:
            if value is None:
                return
            entries = self.history[key] = []
            bisect.insort(self.keys, key)
        entries.append((version, value))
        if len(entries) > 1 or value is None:
            self.collectable.add(key)

    def _collect(self, now: int) -> None:
        """Forget what no readable version can see any more (older than the MVCC window)."""
        horizon = now - MVCC_WINDOW - VERSIONS_PER_SECOND
        first = bisect.bisect_right(self.recent_versions, horizon)
        del self.recent[:first], self.recent_versions[:first]
        dead = []
        for key in list(self.collectable):
            entries = self.history[key]
            keep = [e for e in entries if e[0] > horizon]
            older = [e for e in entries if e[0] <= horizon]
            if older:
                keep.insert(0, older[-1])
            if len(keep) == 1 and keep[0][1] is None:
                dead.append(key)
            else:
                self.history[key] = keep
            if len(keep) == 1:
                self.collectable.discard(key)  # one entry left: only a later write changes it
        for key in dead:
            del self.history[key]
        if dead:
            gone = set(dead)
            self.keys = [k for k in self.keys if k not in gone]

    def watch(self, key: bytes, expected: bytes | None, client: socket.socket) -> bool:
        """Block until ``key`` no longer holds ``expected``; False if the client went away."""
        with self.cond:
            while self._latest(key) == expected:
                self.cond.wait(0.2)
                if _closed(client):
                    return False
            return True


def _stamp(data: bytes, stamp: bytes) -> bytes:
    # API >= 520: the last four bytes are the little-endian offset of the 10-byte placeholder.
    offset = struct.unpack("<I", data[-4:])[0]
    body = data[:-4]
    if offset + 10 > len(body):
        raise _Refused(2000)
    return body[:offset] + stamp + body[offset + 10:]


def _closed(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class _Refused(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def recv_message(sock: socket.socket) -> Any:
    header = _recv_exactly(sock, _HEADER.size)
    if header is None:
        return None
    body = _recv_exactly(sock, _HEADER.unpack(header)[0])
    return None if body is None else pickle.loads(body)


def send_message(sock: socket.socket, message: Any) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(_HEADER.pack(len(body)) + body)


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


_OPERATIONS = frozenset({"read_version", "get", "get_many", "get_range", "commit", "watch"})


class _Handler(socketserver.BaseRequestHandler):
    store: Store

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                request = recv_message(sock)
            except OSError:
                return
            if request is None:
                return
            op, *args = request
            try:
                if op not in _OPERATIONS:
                    raise _Refused(2000)
                if op == "watch":
                    if not self.store.watch(args[0], args[1], sock):
                        return
                    reply: Any = ("ok", None)
                else:
                    reply = ("ok", getattr(self.store, op)(*args))
            except _Refused as exc:
                reply = ("error", exc.code)
            try:
                send_message(sock, reply)
            except OSError:
                return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def main() -> None:
    store = Store()
    handler = type("Handler", (_Handler,), {"store": store})
    with _Server(("127.0.0.1", 0), handler) as server:
        print(server.server_address[1], flush=True)
        server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
