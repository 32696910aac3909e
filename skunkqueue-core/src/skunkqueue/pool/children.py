"""The pool's table of its worker processes: one :class:`Child` each, with the jobs it holds.

Every role of the pool reads this table and the supervisor, the lease keeper
and the upkeep all act on it, so it stands below them. What it guarantees:

* a :class:`Child` knows its process, the pipes to it (:mod:`skunkqueue.channel`),
  the id it registered under, and a :class:`Claim` for every job it reported
  claiming and has not reported done; a fresh process starts with an empty table;
* a worker process dies with the pool (PR_SET_PDEATHSIG on Linux), so a pool
  killed with SIGKILL leaves no worker running jobs whose leases nobody renews;
* a held job is handed back to the store (:meth:`Child.hand_back`) only while the
  store still holds it under the token of this claim, and without charging an
  attempt; a job someone else took meanwhile is left alone;
* a store call made by a role (:func:`store_call`) never stops the pool: a failure
  is one warning, and the role tries again at its next turn.
"""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass, field, replace
from typing import Callable, TypeVar

from skunkqueue import channel, interpreter, policy
from skunkqueue.errors import JobKilled, SkunkQueueError
from skunkqueue.forkserver import WORKER_MODULE, Forked, ForkServer, die_with_parent, stopped
from skunkqueue.persistence.roles import JobStore
from skunkqueue.record import RUNNING
from skunkqueue.worker import WorkerConfig

log = logging.getLogger("skunkqueue.pool")  # one name for the whole pool, as its log always read
T = TypeVar("T")

__all__ = ["Child", "Claim", "die_with_parent", "stopped", "store_call"]


def store_call(what: str, call: Callable[..., T], *args: object) -> T | None:
    """Call the store; a failure is logged and retried on a later tick, never fatal."""
    try:
        return call(*args)
    except SkunkQueueError as exc:
        log.warning("pool: %s: %s", what, exc)
        return None


@dataclass
class Claim:
    token: int
    timeout: float            # seconds, 0: no limit
    claimed_at: float         # time.monotonic()
    started_at: float | None = None
    interrupt: tuple[JobKilled, float] | None = None  # the worker was asked to stop it (why, when)


@dataclass
class Child:
    """One worker process and what the pool knows of it."""

    config: WorkerConfig
    process: subprocess.Popen[bytes] | Forked | None = None
    pipes: channel.PoolEnd | None = None
    worker_id: str | None = None
    claims: dict[str, Claim] = field(default_factory=dict)  # held and running jobs
    # Jobs it started and then gave up on without an outcome ("d ID lost"): the store may
    # still hold them under its token, so they are never taken for claims it did not report.
    gave_up: dict[str, Claim] = field(default_factory=dict)
    killed_for: JobKilled | None = None   # the pool SIGKILLed it for this reason...
    killed_job: str | None = None         # ...which concerns this job (None: all it ran)
    settled: bool = True                  # the dead process's jobs were dealt with
    started: float = 0.0
    backoff: float = 0.5
    restart_at: float = 0.0
    told_never_start: set[str] = field(default_factory=set)
    drained: bool = False                 # --burst: it found no due job and exited; not restarted
    handed_back: int = 0                  # jobs of this process put back in the queue (see hand_back)
    leaving: bool = False                 # it said it unregisters, then exits: no more heartbeats
    unregistered: bool = False            # a heartbeat found its id gone (see Upkeep._heartbeat)

    def start(self, forks: ForkServer | None = None) -> bool:
        """Start its worker process: forked by ``forks`` if given, else a fresh interpreter.
        False if ``forks`` failed (the worker then started as a fresh interpreter): drop it."""
        failed = False
        pipes, config, fds = self._new_pipes()
        if forks is not None:
            try:
                self.process = forks.spawn(config, fds)
                pipes.pulse()  # taken: the forked worker waits for this before it runs
            except OSError as exc:
                log.warning("pool: %s; starting workers as fresh interpreters from now on", exc)
                failed = True
                # A worker the server forked before it failed holds these pipes: closed, they tell
                # it that it was not taken (it exits), and its events reach no one.
                pipes.close()
                pipes, config, fds = self._new_pipes()
        if forks is None or failed:
            self.process = subprocess.Popen(interpreter.command(WORKER_MODULE, config),
                                            preexec_fn=die_with_parent, pass_fds=fds)
        pipes.after_spawn()
        self.worker_id, self.killed_for, self.killed_job = None, None, None
        self.claims, self.told_never_start, self.gave_up = {}, set(), {}
        self.settled, self.handed_back, self.leaving, self.unregistered = False, 0, False, False
        self.started = time.monotonic()
        return not failed

    def _new_pipes(self) -> tuple[channel.PoolEnd, str, tuple[int, int, int]]:
        """New pipes to the worker about to start; its configuration, which names their fds; the fds."""
        self.pipes = pipes = channel.PoolEnd()
        fds = pipes.child_fds()
        return pipes, replace(self.config, events_fd=fds[0], control_fd=fds[1], pulse_fd=fds[2]).to_json(), fds

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def running(self) -> dict[str, Claim]:
        """The jobs it started and has not finished (several for async jobs)."""
        return {job_id: c for job_id, c in self.claims.items() if c.started_at is not None}

    def kill(self, why: JobKilled, job_id: str | None = None) -> None:
        if self.alive and self.process is not None:
            self.killed_for, self.killed_job = why, job_id
            self.process.kill()

    def hand_back(self, store: JobStore | None, job_id: str) -> None:
        """Put a claimed job that never started back in the queue, without charging an attempt."""
        claim = self.claims.pop(job_id, None)
        if claim is None or store is None:
            return
        record = store_call("read a job", store.get, job_id)
        if record is not None and record.state == RUNNING and record.token == claim.token:
            if store_call("hand back a job", store.finish, job_id, claim.token, policy.release(record)):
                self.handed_back += 1
