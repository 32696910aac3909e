"""The two pipes between a worker process and its pool.

The pool, not the worker, renews the leases of the jobs its workers hold,
sends their heartbeats, enforces time limits and acts on kill requests. The
pool runs no job code, so none of that depends on the job's thread ever
getting the GIL back: a job stuck in C code still has its lease renewed, and
is still stopped (by SIGKILL, as a last resort) when its time is up. For that
the pool must know which jobs each worker holds; the worker tells it here.

Worker -> pool, one event a line:

``h WORKER_ID``
    registered under this id; sent once, before any job.
``c T JOB_ID TOKEN TIMEOUT``
    claimed (held, not started). ``T`` is ``time.monotonic()`` at the claim;
    both processes run on one host, so the pool can compare it with its own
    clock. ``TIMEOUT`` is the job's time limit in seconds, 0 for none.
``s T JOB_ID``
    about to start the job. Written *before* the worker's last checks, so a
    pool that has not read it can trust the job has not started (see
    :data:`START_WITHIN`).
``d JOB_ID STATE SECONDS``
    the attempt is over: STATE is the outcome recorded (``lost`` if it was
    discarded after a lost lease), SECONDS how long the job ran. The pool
    counts these for :mod:`skunkqueue.metrics`.
``k JOB_ID``
    the worker will not start this held job; the pool hands it back.

Pool -> worker, one command a line, each written with one ``os.write`` of
less than ``PIPE_BUF`` bytes (so it arrives whole):

``i JOB_ID REASON``
    interrupt the running job if it is JOB_ID (followed by SIGUSR1); REASON
    is one of :data:`REASONS`.
``x JOB_ID``
    a kill was requested for a held job: never start it.
``t HOW``
    stop, ``gentle`` or ``rough`` (sent with the signal, in case a job
    ignored or swallowed the signal).

A third pipe carries the pool's pulse: one byte each time the pool renewed
the worker's leases (or had none to renew). A worker that hears nothing for
two thirds of its lease - the pool is stopped, or cannot reach the store -
stops its jobs as if their leases were lost, before another worker may take
them over.

Ids are percent-encoded (they come from the store, and a route may hold a
space or a newline); the job ids SkunkQueue makes are hex and pass unchanged.
"""

from __future__ import annotations

import errno
import os
import re
import select
from dataclasses import dataclass
from urllib.parse import quote as _quote
from urllib.parse import unquote

# A held job is started only within this many seconds of its claim; after
# that the pool may hand it back to the queue (a little later, see pool.py),
# so a prefetched job never waits long behind a slow or stuck job.
START_WITHIN = 1.0

KILL, TIME, LOST = "kill", "time", "lost"
REASONS = (KILL, TIME, LOST)

_READ_SIZE = 65536  # a pipe's whole buffer: one read returns whole writes


def _set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


@dataclass
class Command:
    """Something the pool told the worker."""

    kind: str        # "i" (interrupt the running job) or "x" (never start this held job)
    job_id: str
    reason: str = ""


class WorkerEnd:
    """The worker's side: write events, read commands. Without fds (a worker
    run in-process by a test), writing and reading do nothing."""

    def __init__(self, events_fd: int | None = None, control_fd: int | None = None,
                 pulse_fd: int | None = None) -> None:
        self.events_fd = events_fd
        self.control_fd = control_fd
        self.pulse_fd = pulse_fd
        if control_fd is not None:
            _set_nonblocking(control_fd)

    def wait_pulse(self, timeout: float) -> bool:
        """True if the pool's pulse came within ``timeout`` seconds (blocks; for the watchdog thread)."""
        if self.pulse_fd is None:
            return True
        ready, _, _ = select.select([self.pulse_fd], [], [], timeout)
        if not ready:
            return False
        try:
            return bool(os.read(self.pulse_fd, 4096))
        except OSError:
            return False

    def send(self, *lines: str) -> None:
        if self.events_fd is None or not lines:
            return
        data = ("\n".join(lines) + "\n").encode()
        while data:
            try:
                written = os.write(self.events_fd, data)
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
            except BrokenPipeError:
                return  # the pool is gone; PR_SET_PDEATHSIG ends us shortly
            data = data[written:]

    def commands(self) -> list[Command]:
        """Every command waiting, without blocking.

        Safe to call from a signal handler while the main thread is inside
        this method too: each read returns whole commands and nothing is
        buffered between calls.
        """
        if self.control_fd is None:
            return []
        found: list[Command] = []
        while True:
            try:
                chunk = os.read(self.control_fd, _READ_SIZE)
            except BlockingIOError:
                return found
            except OSError as exc:  # pragma: no cover - the pool closed its end
                if exc.errno in (errno.EBADF, errno.EPIPE):
                    return found
                raise
            if not chunk:
                return found
            for line in chunk.decode(errors="replace").splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0] == "i":
                    found.append(Command("i", unquote(parts[1]), parts[2]))
                elif len(parts) == 2 and parts[0] == "x":
                    found.append(Command("x", unquote(parts[1])))
                elif len(parts) == 2 and parts[0] == "t" and parts[1] in ("gentle", "rough"):
                    found.append(Command("t", "", parts[1]))


@dataclass
class Event:
    """Something a worker told the pool."""

    kind: str            # h, c, s, d or k
    job_id: str = ""     # for h: the worker id
    at: float = 0.0      # monotonic time (c, s)
    token: int = 0       # c
    timeout: float = 0.0  # c
    state: str = ""      # d: the outcome's state
    seconds: float = 0.0  # d: how long the job ran


class PoolEnd:
    """The pool's side for one worker: read events, write commands."""

    def __init__(self) -> None:
        self.events_read, self.events_write = os.pipe()
        self.control_read, self.control_write = os.pipe()
        self.pulse_read, self.pulse_write = os.pipe()
        _set_nonblocking(self.events_read)
        _set_nonblocking(self.control_write)
        _set_nonblocking(self.pulse_write)
        self._partial = b""

    def child_fds(self) -> tuple[int, int, int]:
        """The fds the worker process inherits: (events to write, commands to read, pulse to read)."""
        return self.events_write, self.control_read, self.pulse_read

    def after_spawn(self) -> None:
        """Close the child's ends in the pool, so a dead worker reads as end of file."""
        for fd in (self.events_write, self.control_read, self.pulse_read):
            os.close(fd)
        self.events_write = self.control_read = self.pulse_read = -1

    def pulse(self) -> None:
        try:
            os.write(self.pulse_write, b".")
        except (BlockingIOError, BrokenPipeError, OSError):
            pass  # a full pipe already says "alive"

    def events(self) -> list[Event]:
        """Every whole event the worker has written so far, without blocking."""
        data = self._partial
        while True:
            try:
                chunk = os.read(self.events_read, _READ_SIZE)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        *lines, self._partial = data.split(b"\n")
        return [event for event in map(_parse_event, lines) if event is not None]

    def command(self, line: str) -> bool:
        """Send one command; False if the worker's pipe is full (it is stuck) or gone."""
        try:
            os.write(self.control_write, (line + "\n").encode())
            return True
        except (BlockingIOError, BrokenPipeError):
            return False

    def close(self) -> None:
        for fd in (self.events_read, self.events_write, self.control_read, self.control_write,
                   self.pulse_read, self.pulse_write):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.events_read = self.events_write = self.control_read = self.control_write = -1
        self.pulse_read = self.pulse_write = -1


_PLAIN = re.compile(r"[A-Za-z0-9_.~-]*\Z").match  # what quote() leaves unchanged


def quote(text: str) -> str:
    """An id as one space-free, newline-free word (hex ids come out unchanged)."""
    # The ids SkunkQueue makes are plain: skip urllib's per-character work (three ids a job).
    return text if _PLAIN(text) else _quote(text, safe="")


def _parse_event(raw: bytes) -> Event | None:
    parts = raw.decode(errors="replace").split()
    try:
        if parts[0] == "h" and len(parts) == 2:
            return Event("h", unquote(parts[1]))
        if parts[0] == "c" and len(parts) == 5:
            return Event("c", unquote(parts[2]), at=float(parts[1]), token=int(parts[3]),
                         timeout=float(parts[4]))
        if parts[0] == "s" and len(parts) == 3:
            return Event("s", unquote(parts[2]), at=float(parts[1]))
        if parts[0] == "d" and len(parts) == 4:
            return Event("d", unquote(parts[1]), state=parts[2], seconds=float(parts[3]))
        if parts[0] == "k" and len(parts) == 2:
            return Event("k", unquote(parts[1]))
    except (IndexError, ValueError):
        pass
    return None
