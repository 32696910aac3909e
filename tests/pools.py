"""``skunq work`` started as a terminal starts it, for tests that signal its whole group.

The pool leads a process group of its own (its fork server and workers are in it); its output
goes to a log file; on the way out the whole group is killed, whatever the test left running.

Not the kit's ``PoolProcess`` (skunkqueue.testing.workers), which starts a pool for a
``BackendUnderTest`` with the kit's arguments, job modules and environment: these tests give
``skunq work`` the command line and the whole environment a user would (the fork server's tests
start the same pool with and without SKUNQ_WORKER_START=spawn and compare), and find the pool's
processes by that command line.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator, Mapping, Sequence

SKUNQ = str(Path(sys.executable).with_name("skunq"))


def start(args: Sequence[str], *, cwd: Path, env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``skunq work ARGS`` leading its own process group, its output in ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen([SKUNQ, "work", *args], cwd=cwd, env=dict(env), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(pool: subprocess.Popen[bytes]) -> None:
    """SIGKILL the pool's whole group (a no-op once it is gone) and reap the pool."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pool.pid, signal.SIGKILL)
    pool.wait(10)


@contextlib.contextmanager
def running(args: Sequence[str], *, cwd: Path, env: Mapping[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """:func:`start`, then :func:`kill_group` however the block ends."""
    pool = start(args, cwd=cwd, env=env, log=log)
    try:
        yield pool
    finally:
        kill_group(pool)
