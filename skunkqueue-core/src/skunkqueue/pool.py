"""The WorkerPool: starts one worker process per route, supervises them, relays signals.

Gentle signals (SIGHUP, SIGABRT, SIGQUIT, SIGTERM) become SIGTERM to every
worker: each finishes its job, unregisters, and the pool exits 0. SIGINT is
rough: the workers interrupt their jobs (state ``killed``), unregister, and
the pool exits 130. A SIGINT during a gentle stop escalates it.

SIGKILL cannot be handled, so nothing relies on it being handled: on Linux
the workers ask the kernel to kill them when the pool dies (PR_SET_PDEATHSIG);
elsewhere they notice their parent is gone within a second. Their jobs' leases
then run out and any pool started later hands those jobs out again; dead
workers are reaped from the registry when their heartbeats stop.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from types import FrameType

from skunkqueue.errors import BackendUnavailable
from skunkqueue.worker import EXIT_UNREACHABLE, GENTLE_SIGNALS, ROUGH_SIGNAL, WorkerConfig

log = logging.getLogger("skunkqueue.pool")

EXIT_ROUGH = 130
RESTART_BACKOFF_MAX = 30.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


class _Child:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.backoff = 0.5
        self.restart_at = 0.0

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "skunkqueue.worker", self.config.to_json()],
            preexec_fn=_die_with_parent,
        )
        self.started = time.monotonic()


class WorkerPool:
    """Runs ``concurrency`` worker processes for each route listed (duplicates count)."""

    def __init__(self, base: WorkerConfig, routes: list[str], concurrency: int = 1) -> None:
        self.children = [_Child(replace(base, route=route)) for route in routes for _ in range(concurrency)]
        self.stopping: str | None = None

    def _on_gentle(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping is None:
            log.info("pool: %s, stopping workers gently", signal.Signals(signum).name)
            self.stopping = "gentle"
            self._signal_all(signal.SIGTERM)

    def _on_rough(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping != "rough":
            log.info("pool: SIGINT, stopping workers roughly")
            self.stopping = "rough"
            self._signal_all(signal.SIGINT)

    def _signal_all(self, sig: int) -> None:
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                try:
                    child.process.send_signal(sig)
                except ProcessLookupError:
                    pass

    def check_backend(self) -> None:
        """Fail fast, with the address in the message, if the store is unreachable."""
        config = self.children[0].config
        pause = 0.5
        for attempt in range(1, config.connect_attempts + 1):
            try:
                backend = config.open()
                try:
                    # A round trip: a backend may open its connection lazily
                    # (fdb.open does), and then constructing it proves nothing.
                    backend.workers()
                finally:
                    backend.close()
                return
            except BackendUnavailable as exc:
                if attempt == config.connect_attempts:
                    raise
                log.warning("pool: %s (attempt %d of %d)", exc, attempt, config.connect_attempts)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)

    def run(self) -> int:
        """Start the workers and supervise them until a signal stops the pool."""
        for sig in GENTLE_SIGNALS:
            signal.signal(sig, self._on_gentle)
        signal.signal(ROUGH_SIGNAL, self._on_rough)
        self.check_backend()
        for child in self.children:
            child.start()
        log.info("pool %d: started %d worker(s)", os.getpid(), len(self.children))
        while True:
            alive = 0
            for child in self.children:
                alive += self._supervise(child)
            if self.stopping and alive == 0:
                break
            time.sleep(0.1)
        log.info("pool %d: all workers stopped", os.getpid())
        return EXIT_ROUGH if self.stopping == "rough" else 0

    def _supervise(self, child: _Child) -> int:
        """1 if the child is running; restarts a crashed child unless the pool is stopping."""
        process = child.process
        if process is not None and process.poll() is None:
            return 1
        if self.stopping:
            return 0
        now = time.monotonic()
        if process is not None:
            code = process.returncode
            if code == EXIT_UNREACHABLE:
                log.error("pool: a worker for route %s could not reach the backend", child.config.route)
            else:
                log.error("pool: worker for route %s exited with status %s; restarting",
                          child.config.route, code)
            if now - child.started > 60:
                child.backoff = 0.5
            child.restart_at = now + child.backoff
            child.backoff = min(child.backoff * 2, RESTART_BACKOFF_MAX)
            child.process = None
        if now >= child.restart_at:
            child.start()
            return 1
        return 0
