"""Wake-ups between processes on one host, through FIFOs in a folder beside a file.

The SQLite backend uses it so that an idle worker (or a result waiter) sleeps
until a producer (or the finishing worker) pokes it, instead of polling the
database. Each waiter makes a FIFO for as long as it waits; a poker lists the
folder after its commit and writes one byte into the FIFOs whose names match.

A poke is only a hint. Waiters make their FIFO *before* they look at the
database and wait only if that look found nothing, while pokers list the
folder *after* their commit: so every commit is either seen by the look or
poked. A poke that is lost anyway (a waiter of another user whose FIFO this
process may not open, a folder that cannot be created) costs the waiter no
more than its polling timeout; correctness never depends on it.

Why FIFOs and not unix sockets: a socket's path is limited to ~107 bytes, and
queue files live at arbitrary depths; FIFOs are reached through the folder's
descriptor, so any path works. A FIFO whose reader died (``kill -9``) refuses
a non-blocking open with ENXIO: the poker removes it and moves on.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import select
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger("skunkqueue.sqlite")

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
# A folder that could not be opened is tried again after this long (its
# creator may be a worker of another user that starts later).
RETRY_OPEN = 1.0


def tag(*parts: str) -> str:
    """A short fixed-width name part for arbitrary text (route, worker id, job id)."""
    return hashlib.blake2b("\0".join(parts).encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


class WakeFolder:
    """The folder ``<file>-wake`` and the FIFOs in it. One per open store, one thread at a time."""

    def __init__(self, beside: Path) -> None:
        self.path = beside.with_name(beside.name + "-wake")
        self._beside = beside
        self._fd: int | None = None
        self._tried_at = -RETRY_OPEN
        self._names: list[str] | None = None  # the listing, while one poke round lasts

    @property
    def supported(self) -> bool:
        # Everything goes through the folder's descriptor (the *at() calls); Windows has no FIFOs.
        return (hasattr(os, "mkfifo") and hasattr(select, "poll") and bool(_DIRECTORY)
                and {os.mkfifo, os.open, os.rename, os.unlink, os.chmod} <= os.supports_dir_fd
                and os.listdir in os.supports_fd)

    def folder(self) -> int | None:
        """The folder's descriptor, making the folder if missing; None if it cannot be had."""
        if self._fd is not None or not self.supported:
            return self._fd
        now = time.monotonic()
        if now - self._tried_at < RETRY_OPEN:
            return None
        self._tried_at = now
        try:
            self._make()
            fd = os.open(self.path, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC)
        except OSError as exc:
            log.debug("no wake-up folder %s (%s): waiting workers poll", self.path, exc)
            return None
        self._fd = fd
        return fd

    def _make(self) -> None:
        if os.path.isdir(self.path):
            return
        # Whoever may write the queue file may poke its workers: the folder and
        # the FIFOs get the file's group and other write bits, whatever the umask
        # of the process that happens to make them first; a shared folder is
        # sticky, so that nobody removes another user's FIFOs.
        shared = os.stat(self._beside).st_mode & 0o022
        mode = 0o700 | (0o070 if shared & 0o020 else 0) | (0o007 if shared & 0o002 else 0)
        try:
            os.mkdir(self.path, 0o700)
        except FileExistsError:
            return
        os.chmod(self.path, mode | (stat.S_ISVTX if shared else 0))

    def _fifo_mode(self) -> int:
        try:
            return 0o600 | (os.stat(self._beside).st_mode & 0o022)
        except OSError:
            return 0o600

    @contextmanager
    def listen(self, prefix: str) -> Iterator[Ear | None]:
        """A FIFO named ``prefix`` + a random part, visible to pokers while the block runs.

        Yields None where no FIFO can be made (then the caller polls).
        """
        folder = self.folder()
        if folder is None:
            yield None
            return
        name = f"{prefix}.{os.getpid()}.{random.getrandbits(48):012x}"
        hidden = "." + name
        try:
            os.mkfifo(hidden, 0o600, dir_fd=folder)
        except OSError as exc:  # a read-only folder of another user, a full disk
            log.debug("cannot make a FIFO in %s (%s): polling", self.path, exc)
            yield None
            return
        read_fd = write_fd = -1
        try:
            os.chmod(hidden, self._fifo_mode(), dir_fd=folder)
            read_fd = os.open(hidden, os.O_RDONLY | os.O_NONBLOCK | _CLOEXEC, dir_fd=folder)
            # Our own writer keeps the FIFO from reporting end-of-file after a
            # poker closes it (select would then return at once, again and again).
            write_fd = os.open(hidden, os.O_WRONLY | os.O_NONBLOCK | _CLOEXEC, dir_fd=folder)
            # Only now, with a reader, does it get a name pokers look for: a
            # visible FIFO without a reader is a dead waiter's.
            os.rename(hidden, name, src_dir_fd=folder, dst_dir_fd=folder)
            hidden = ""
            yield Ear(read_fd)
        finally:
            try:
                os.unlink(hidden or name, dir_fd=folder)
            except OSError:
                pass  # a poker took it for a dead waiter's
            for fd in (read_fd, write_fd):
                if fd >= 0:
                    os.close(fd)

    def poke(self, prefix: str, wanted: int | None = None) -> int:
        """Write a byte into up to ``wanted`` (None: all) FIFOs named ``prefix``…; return how many."""
        folder = self.folder()
        if folder is None:
            return 0
        names = self._names
        if names is None:
            try:
                names = self._names = os.listdir(folder)
            except OSError:
                return 0
        matching = [n for n in names if n.startswith(prefix)]
        if wanted is not None and len(matching) > wanted:
            random.shuffle(matching)  # spread the work over the idle workers, no herd
        sent = 0
        for name in matching:
            if wanted is not None and sent >= wanted:
                break
            try:
                fd = os.open(name, os.O_WRONLY | os.O_NONBLOCK | _NOFOLLOW | _CLOEXEC, dir_fd=folder)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # nobody reads it: its waiter was killed
                    try:
                        os.unlink(name, dir_fd=folder)
                    except OSError:
                        pass
                continue  # gone already, or not ours to open
            try:
                # Never write into anything but a FIFO (a planted regular file, a device).
                if stat.S_ISFIFO(os.fstat(fd).st_mode):
                    os.write(fd, b"!")
                    sent += 1
            except BlockingIOError:
                sent += 1  # full: that waiter has pokes to read already
            except OSError:
                pass
            finally:
                os.close(fd)
        return sent

    @contextmanager
    def round(self) -> Iterator[None]:
        """Pokes inside share one listing of the folder."""
        self._names = None
        try:
            yield
        finally:
            self._names = None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Ear:
    """The reading end of one waiter's FIFO."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def wait(self, timeout: float) -> bool:
        """True if poked within ``timeout`` seconds (the pokes are consumed)."""
        if timeout > 0:
            poller = select.poll()  # not select(): descriptors over 1023 happen in busy programs
            poller.register(self.fd, select.POLLIN)
            if not poller.poll(timeout * 1000):
                return False
        try:
            return bool(os.read(self.fd, 4096))
        except BlockingIOError:
            return False
