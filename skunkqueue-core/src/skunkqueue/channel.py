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
``b WORKER_ID``
    it is about to unregister, then exit: the pool sends no more heartbeats
    for it (one would find the id gone and register it again).

Pool -> worker, one command a line, each written with one ``os.write`` of
less than ``PIPE_BUF`` bytes (so it arrives whole):

``i JOB_ID REASON``
    interrupt the running job if it is JOB_ID (followed by SIGUSR1); REASON
    is one of :class:`Reason`.
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

Each line is one of the dataclasses below: :data:`Event` one way,
:data:`Command` the other. Both sides hand objects to :meth:`WorkerEnd.send`
and :meth:`PoolEnd.send`; :func:`encode` and :func:`decode_event` /
:func:`decode_command` are the only places that know the letters. A line
neither decoder can read raises :class:`ChannelError`; the ends log it as one
error and read on.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import select
from dataclasses import dataclass
from enum import Enum
from typing import Callable, TypeVar, Union
from urllib.parse import quote as _quote
from urllib.parse import unquote

log = logging.getLogger("skunkqueue.channel")
T = TypeVar("T")

# A held job is started only within this many seconds of its claim; after
# that the pool may hand it back to the queue (a little later, see pool.py),
# so a prefetched job never waits long behind a slow or stuck job.
START_WITHIN = 1.0



class Word(str, Enum):
    """A str enum that prints as its value on every Python (3.12 changed what format() gives)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Reason(Word):
    """Why the pool interrupts a running job."""

    KILL = "kill"  # a kill was requested
    TIME = "time"  # its time limit passed
    LOST = "lost"  # its lease is lost: another worker may own it now


class StopMode(Word):
    """How the pool tells a worker to stop (the signal's meaning, see :mod:`skunkqueue.worker`)."""

    GENTLE = "gentle"  # finish the current job, then stop
    ROUGH = "rough"    # interrupt the current job (killed), then stop


class ChannelError(ValueError):
    """A line on a pipe that is no event or command of this module."""


# -- worker -> pool ---------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """Registered under this id; sent once, before any job."""

    worker_id: str


@dataclass(frozen=True)
class Claimed:
    """Claimed (held, not started) at monotonic time ``at``; ``timeout`` 0 for none."""

    at: float
    job_id: str
    token: int
    timeout: float


@dataclass(frozen=True)
class Starting:
    """About to start the job, before the worker's last checks."""

    at: float
    job_id: str


@dataclass(frozen=True)
class Done:
    """The attempt is over: ``state`` is the outcome recorded, or ``lost``."""

    job_id: str
    state: str
    seconds: float


@dataclass(frozen=True)
class HandBack:
    """The worker will not start this held job."""

    job_id: str


@dataclass(frozen=True)
class Goodbye:
    """About to unregister, then exit: no more heartbeats for this id."""

    worker_id: str


Event = Union[Hello, Claimed, Starting, Done, HandBack, Goodbye]


# -- pool -> worker ---------------------------------------------------------------------


@dataclass(frozen=True)
class Interrupt:
    """Interrupt the running job if it is ``job_id`` (followed by SIGUSR1)."""

    job_id: str
    reason: Reason


@dataclass(frozen=True)
class NeverStart:
    """A kill was requested for a held job: never start it."""

    job_id: str


@dataclass(frozen=True)
class Stop:
    """Stop (sent with the signal, in case a job ignored or swallowed the signal)."""

    how: StopMode


Command = Union[Interrupt, NeverStart, Stop]


def encode(message: Event | Command) -> str:
    """The line (without its newline) that carries ``message``."""
    if isinstance(message, Hello):
        return f"h {quote(message.worker_id)}"
    if isinstance(message, Claimed):
        return f"c {message.at:.6f} {quote(message.job_id)} {message.token} {message.timeout:g}"
    if isinstance(message, Starting):
        return f"s {message.at:.6f} {quote(message.job_id)}"
    if isinstance(message, Done):
        return f"d {quote(message.job_id)} {quote(message.state)} {message.seconds:.6f}"
    if isinstance(message, HandBack):
        return f"k {quote(message.job_id)}"
    if isinstance(message, Goodbye):
        return f"b {quote(message.worker_id)}"
    if isinstance(message, Interrupt):
        return f"i {quote(message.job_id)} {message.reason.value}"
    if isinstance(message, NeverStart):
        return f"x {quote(message.job_id)}"
    if isinstance(message, Stop):
        return f"t {message.how.value}"
    raise TypeError(f"{type(message).__name__} is no event or command of the channel")


def decode_event(line: str) -> Event:
    """The event a worker wrote as ``line``; :class:`ChannelError` if it is none."""
    parts = line.split()
    try:
        tag, fields = parts[0], parts[1:]
        if tag == "h" and len(fields) == 1:
            return Hello(unquote(fields[0]))
        if tag == "c" and len(fields) == 4:
            return Claimed(float(fields[0]), unquote(fields[1]), int(fields[2]), float(fields[3]))
        if tag == "s" and len(fields) == 2:
            return Starting(float(fields[0]), unquote(fields[1]))
        if tag == "d" and len(fields) == 3:
            return Done(unquote(fields[0]), unquote(fields[1]), float(fields[2]))
        if tag == "k" and len(fields) == 1:
            return HandBack(unquote(fields[0]))
        if tag == "b" and len(fields) == 1:
            return Goodbye(unquote(fields[0]))
    except (IndexError, ValueError):
        pass
    raise ChannelError(f"not an event of the worker channel: {line[:120]!r}")


def decode_command(line: str) -> Command:
    """The command the pool wrote as ``line``; :class:`ChannelError` if it is none."""
    parts = line.split()
    try:
        tag, fields = parts[0], parts[1:]
        if tag == "i" and len(fields) == 2:
            return Interrupt(unquote(fields[0]), Reason(fields[1]))
        if tag == "x" and len(fields) == 1:
            return NeverStart(unquote(fields[0]))
        if tag == "t" and len(fields) == 1:
            return Stop(StopMode(fields[0]))
    except (IndexError, ValueError):
        pass
    raise ChannelError(f"not a command of the pool channel: {line[:120]!r}")


def _decoded(lines: list[str], decode: Callable[[str], T], unreadable: list[str]) -> list[T]:
    """Every line that decodes; why each other one does not goes to ``unreadable``."""
    found: list[T] = []
    for line in lines:
        if not line.strip():
            continue
        try:
            found.append(decode(line))
        except ChannelError as exc:
            unreadable.append(str(exc))
    return found


def log_unreadable(unreadable: list[str], who: str) -> None:
    """One error line for each line that did not decode, then forget them."""
    while unreadable:
        log.error("%s: %s; line ignored (a worker and a pool of different SkunkQueue versions?)",
                  who, unreadable.pop(0))

_READ_SIZE = 65536  # a pipe's whole buffer: one read returns whole writes


def _set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


class WorkerEnd:
    """The worker's side: write events, read commands. Without fds (a worker
    run in-process by a test), writing and reading do nothing."""

    def __init__(self, events_fd: int | None = None, control_fd: int | None = None,
                 pulse_fd: int | None = None) -> None:
        self.events_fd = events_fd
        self.control_fd = control_fd
        self.pulse_fd = pulse_fd
        self.unreadable: list[str] = []  # why a command line did not decode (see log_unreadable)
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

    def send(self, *events: Event) -> None:
        """Tell the pool ``events``, in one write."""
        if self.events_fd is None or not events:
            return
        data = "".join(encode(event) + "\n" for event in events).encode()
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
            # Called from a signal handler: what does not decode is kept, and logged by the loop.
            found += _decoded(chunk.decode(errors="replace").splitlines(), decode_command, self.unreadable)


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
        unreadable: list[str] = []
        events = _decoded([line.decode(errors="replace") for line in lines], decode_event, unreadable)
        log_unreadable(unreadable, "pool")
        return events

    def send(self, command: Command) -> bool:
        """Send one command; False if the worker's pipe is full (it is stuck) or gone."""
        try:
            os.write(self.control_write, (encode(command) + "\n").encode())
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
