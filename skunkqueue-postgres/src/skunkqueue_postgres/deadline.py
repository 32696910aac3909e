"""Deadlines for the calls on a psycopg connection: a silent server cannot hold a caller forever.

psycopg waits for a reply with no read timeout, and nothing below it notices a
peer that stopped answering while something still acknowledges its packets (a
half-open link: a proxy or middlebox whose server side is gone, a NAT that
forgot the flow but a firewall answering): TCP keepalives and libpq's
``tcp_user_timeout`` are answered or never needed (the data is acknowledged),
``statement_timeout`` runs on a server that never got the statement, and
``cancel()`` reaches a backend that is already gone. Measured through
tests/faultproxy.py's half-open link, each of those left ``execute`` waiting
past 30 s.

What works is on the client: when a call's deadline passes, a watchdog thread
shuts the connection's socket down. psycopg's wait then wakes up, reads
end-of-file and raises ``OperationalError``; the connection is broken and the
backend discards it (and, for a call that is safe to repeat, tries once more
on a new one).

One watchdog thread per process serves every connection; arming and
disarming a deadline is a heap push and a flag under one lock.
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time
from types import TracebackType
from typing import Callable

ARMED, DONE, EXPIRED = 0, 1, 2


class Guard:
    """One call's deadline: armed on entry; on exit, :attr:`expired` says whether it went off."""

    __slots__ = ("_watchdog", "_at", "_action", "_state")

    def __init__(self, watchdog: Watchdog, seconds: float, action: Callable[[], None]) -> None:
        self._watchdog = watchdog
        self._at = time.monotonic() + seconds
        self._action = action
        self._state = ARMED

    @property
    def expired(self) -> bool:
        return self._state == EXPIRED

    def __enter__(self) -> Guard:
        self._watchdog.arm(self)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        # Under the watchdog's lock: once this returns with the guard DONE, its action can no longer
        # run, so it never touches a connection that has gone on to its next call.
        with self._watchdog.lock:
            if self._state == ARMED:
                self._state = DONE


class Watchdog:
    """A thread that runs each armed :class:`Guard`'s action once its time has come."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self._heap: list[tuple[float, int, Guard]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def guard(self, seconds: float, action: Callable[[], None]) -> Guard:
        return Guard(self, seconds, action)

    def arm(self, guard: Guard) -> None:
        with self.lock:
            heapq.heappush(self._heap, (guard._at, next(self._order), guard))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="skunkqueue-postgres-deadlines",
                                                daemon=True)
                self._thread.start()
            elif self._heap[0][2] is guard:
                self.lock.notify()  # sooner than what the thread sleeps until

    def _run(self) -> None:
        with self.lock:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][2]._state != ARMED or self._heap[0][0] <= now):
                    _, _, guard = heapq.heappop(self._heap)
                    if guard._state == ARMED:
                        guard._state = EXPIRED
                        try:
                            guard._action()  # a shutdown(): one system call, fine under the lock
                        except Exception:  # the watchdog must outlive any one action
                            pass
                self.lock.wait(None if not self._heap else self._heap[0][0] - now)


_watchdog = Watchdog()


def _after_fork() -> None:
    # The child has none of the parent's threads, and the lock may have been held at the fork.
    global _watchdog
    _watchdog = Watchdog()


os.register_at_fork(after_in_child=_after_fork)


class SocketDeadline:
    """Deadlines for the calls on one connection, whose socket is shut down when one passes.

    Holds a duplicate of the connection's descriptor: the socket it names stays
    the connection's until :meth:`close`, so a late shutdown can never reach
    another socket that was given the same number.
    """

    def __init__(self, fileno: int) -> None:
        self._sock: socket.socket | None = socket.socket(fileno=os.dup(fileno))
        self.expired = False  # a deadline passed and the socket was shut down: the connection is done for

    def within(self, seconds: float) -> Guard:
        return _watchdog.guard(seconds, self._shut_down)

    def _shut_down(self) -> None:
        self.expired = True
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer or by us: the call fails on its own

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
