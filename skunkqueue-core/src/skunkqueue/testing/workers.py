"""Starting and stopping real ``skunq work`` pools for the kit."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

from skunkqueue import interpreter
from skunkqueue.forkserver import NAME
from skunkqueue.testing.kit import BackendUnderTest, kit_env

KIT_JOBS = "skunkqueue.testing.jobs"
FORK_SERVER_NAME = NAME.decode()


class PoolProcess:
    """A ``skunq work`` pool running as a child process of the test.

    ``imports`` are the job modules it imports at start (``--import``; the
    kit's own by default); an empty list starts it in bare mode. Its workers
    get the test's queue and routes in their environment (see
    :func:`skunkqueue.testing.kit.kit_env`), where job modules written with
    ``kit_queue``/``kit_routes`` declare their jobs.
    """

    def __init__(self, backend: BackendUnderTest, queue: str, routes: list[str], *,
                 concurrency: int = 1, lease: float = 30.0, log_path: Path | None = None,
                 extra: list[str] | None = None, imports: Sequence[str] = (KIT_JOBS,),
                 env: dict[str, str] | None = None, cwd: Path | None = None,
                 new_session: bool = False) -> None:
        self.backend = backend
        self.queue = queue
        # Started as the pool starts its workers: without the test's working directory on sys.path.
        args = [*interpreter.command("skunkqueue.command"), "work", "-q", queue, "-r", *routes,
                "--concurrency", str(concurrency), "--lease", str(lease), *backend.cli_args(),
                *(arg for name in imports for arg in ("--import", name)), *(extra or [])]
        self.log_path = log_path
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL
        # new_session: the pool leads its own process group, as under a
        # terminal, so a test can signal the whole group the way a terminal does.
        self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                        env=backend.process_env(SKUNQ_LOG_LEVEL="INFO", **kit_env(queue, routes),
                                                                **(env or {})),
                                        start_new_session=new_session)
        self.expected_workers = len(routes) * concurrency

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until all of the pool's workers are registered."""
        persistence = self.backend.open(self.queue)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the pool exited with {self.process.returncode}: {self.log()}")
                mine = [w for w in persistence.workers() if _ppid(w.pid) == self.pid]
                if len(mine) >= self.expected_workers:
                    return
                time.sleep(0.05)
        finally:
            persistence.close()
        raise TimeoutError(f"workers did not register within {timeout} s: {self.log()}")

    def worker_pids(self) -> list[int]:
        """The pool's worker processes: its children but its fork server."""
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True).stdout
        return [pid for pid in map(int, out.split()) if process_name(pid) != FORK_SERVER_NAME]

    def fork_server_pid(self) -> int | None:
        """The pool's fork server (see :mod:`skunkqueue.forkserver`), None if it has none."""
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True).stdout
        return next((pid for pid in map(int, out.split()) if process_name(pid) == FORK_SERVER_NAME), None)

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        """Signal the pool and every worker at once, as a terminal does (needs new_session)."""
        os.killpg(self.pid, sig)

    def wait(self, timeout: float = 30.0) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log(self) -> str:
        """The log's last 4,000 characters (for a failure's message)."""
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-4000:]
        return ""

    def log_head(self) -> str:
        """The log's first 4,000 characters: its first line, however long the log has grown."""
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[:4000]
        return ""


def process_name(pid: int) -> str:
    """What /proc/PID/comm says ("" for a process that is gone)."""
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as dead
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
