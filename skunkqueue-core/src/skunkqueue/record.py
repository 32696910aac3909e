"""What a backend stores: one record per delivery of a job to a route.

A record is plain data. Backends translate it to their store with
:meth:`JobRecord.to_dict` and :meth:`JobRecord.from_dict`; the latter refuses
anything that is not a well-formed record with :class:`MalformedRecord`, so a
foreign or damaged entry in the store is quarantined instead of crashing a
worker.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final, Literal, Mapping, get_args

from skunkqueue.errors import MalformedRecord

# The job states. These exact strings are part of the public API; the type
# lets mypy catch a misspelt state wherever a record or outcome is built.
State = Literal["pending", "running", "complete", "error", "killed"]
PENDING: Final = "pending"    # queued, or not yet due
RUNNING: Final = "running"    # claimed by a worker that holds a lease on it
COMPLETE: Final = "complete"  # the function returned; ``result`` holds its value
ERROR: Final = "error"        # the function raised (or could not run); ``error`` says why
KILLED: Final = "killed"      # interrupted, or killed before it ran; never run again

# Typed as plain strings: tables keyed by state (counts, summaries) are dict[str, int].
STATES: tuple[str, ...] = get_args(State)
FINISHED_STATES: frozenset[str] = frozenset({COMPLETE, ERROR, KILLED})

# A job whose worker dies keeps being handed out again until it has been
# started this many times, even with ``retries=0``: a crash must not lose work,
# but a job that kills every worker that runs it must not loop forever either.
MIN_ATTEMPTS_ON_LOST_LEASE = 5



class LeaseStatus(str, Enum):
    """What :meth:`Persistence.renew <skunkqueue.persistence.Persistence.renew>` says of one lease.

    A str, so a backend may answer with the plain words (``"ok"``...).
    """

    OK = "ok"      # lease extended
    LOST = "lost"  # the record is no longer ours: stop, record nothing
    KILL = "kill"  # still ours, but someone asked to kill it

    def __str__(self) -> str:  # the word itself on every Python (3.12 changed what str() gives)
        return str(self.value)


# What a job killed on request says about itself.
KILLED_BY_REQUEST = {"type": "JobKilled", "message": "killed by request", "traceback": ""}

# A record's history keeps the entries of its last HISTORY_LIMIT attempts (``history``) and counts
# those dropped to make room (``history_dropped``). Each entry keeps the first ATTEMPT_MESSAGE_CHARS
# of its error message and the last ATTEMPT_TRACEBACK_CHARS of its traceback (where the error was
# raised): twenty entries then stay far below the smallest value a store takes (FoundationDB's 100 kB).
HISTORY_LIMIT: Final = 20
ATTEMPT_MESSAGE_CHARS: Final = 500
ATTEMPT_TRACEBACK_CHARS: Final = 2000

# How an attempt ended, as its history entry says. "lost": its worker vanished (killed, crashed,
# or stopped renewing the lease) and the job was taken back; the others as the job states.
AttemptOutcome = Literal["complete", "error", "killed", "lost"]
LOST: Final = "lost"
ATTEMPT_OUTCOMES: tuple[str, ...] = get_args(AttemptOutcome)

_id_lock = threading.Lock()
_last_id_ns = 0


def new_id() -> str:
    """A 26-hex-digit id whose lexical order follows creation order.

    Backends that break ties between equal due times by id (sorted sets,
    indexes) therefore keep FIFO order without a separate sequence number.
    """
    global _last_id_ns
    with _id_lock:
        now = max(time.time_ns(), _last_id_ns + 1)
        _last_id_ns = now
    return f"{now:016x}{os.urandom(5).hex()}"


@dataclass
class JobRecord:
    """One delivery of a fired job to one route (or, on a broadcast queue, one worker)."""

    id: str
    queue: str
    route: str
    func: str                       # "package.module:qualname"
    payload: bytes                  # the serialized (args, kwargs)
    serializer: str = "json"
    state: State = PENDING
    due: float = 0.0                # epoch seconds; never claimed before this
    created: float = 0.0
    target: str | None = None       # broadcast: the only worker id that may claim it
    attempts: int = 0               # how many times a worker has started it
    retries: int = 0                # how many failures may be retried
    retry_backoff: float = 1.0      # base of the exponential backoff, seconds
    timeout: float | None = None    # time limit for one attempt, seconds
    token: int = 0                  # fencing token: bumped by every claim
    owner: str | None = None        # worker id holding the lease
    lease_until: float | None = None
    kill_requested: bool = False
    started: float | None = None
    finished: float | None = None
    result: bytes | None = None     # the serialized return value
    error: dict[str, str] | None = None  # {"type", "message", "traceback"}
    dead: bool = False              # in the dead-letter list: out of attempts
    key: str | None = None          # idempotency key: one record per key in a queue (see enqueue_keyed)
    result_ttl: float | None = None  # seconds the finished record is kept (None: the backend's default)
    # Workflows (skunkqueue.workflow): a record with parents waits, pending but not claimable
    # (due = dependencies.WAITING_DUE), until the store releases it once all parents finished.
    parents: list[str] | None = None  # ids of the jobs it waits for
    inputs: Any = None              # ids (nested lists) whose results are passed as the first argument
    on_failure: str | None = None   # "run": run even if a parent failed; None: end killed
    workflow: str | None = None     # the id of the workflow it belongs to
    # Flow control (skunkqueue.flow; the store enforces it in claim, see Persistence):
    priority: int = 0               # higher is claimed first within a route; FIFO among equals
    limit_key: str | None = None    # jobs with equal keys share the limits below
    limit_concurrency: int | None = None  # at most this many running (with a live lease) per key
    limit_interval: float | None = None   # rate: seconds between starts per key (GCRA)...
    limit_burst: int | None = None        # ...with this many at once after a quiet spell
    # One entry per ended attempt, oldest first, at most HISTORY_LIMIT (see attempt_entry); each is
    # appended by the finish that ends the attempt, in the same atomic step.
    history: list[dict[str, Any]] = field(default_factory=list)
    history_dropped: int = 0        # older entries dropped to keep HISTORY_LIMIT

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobRecord:
        """Build a record from what a backend stored, or raise MalformedRecord."""
        try:
            missing = [name for name in _REQUIRED if name not in data]
            if missing:
                raise MalformedRecord(f"record is missing {', '.join(missing)}")
            values = {name: data[name] for name in _FIELDS if name in data}
            record = cls(**values)
            record._check()
            return record
        except MalformedRecord:
            raise
        except Exception as exc:
            raise MalformedRecord(f"unreadable record: {exc}") from None

    def _check(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise MalformedRecord("record id is not a string")
        if self.state not in STATES:
            raise MalformedRecord(f"unknown state {self.state!r}")
        if not isinstance(self.func, str) or ":" not in self.func:
            raise MalformedRecord(f"func {self.func!r} is not 'module:name'")
        if not isinstance(self.payload, (bytes, bytearray)):
            raise MalformedRecord("payload is not bytes")
        self.payload = bytes(self.payload)
        for name in ("due", "created", "retry_backoff"):
            setattr(self, name, float(getattr(self, name)))
        for name in ("attempts", "retries", "token"):
            setattr(self, name, int(getattr(self, name)))
        self.kill_requested = bool(self.kill_requested)
        self.dead = bool(self.dead)
        if self.key is not None and not isinstance(self.key, str):
            raise MalformedRecord("key is not a string")
        if self.result_ttl is not None:
            self.result_ttl = float(self.result_ttl)
        self.priority = int(self.priority)
        if self.limit_key is not None and not isinstance(self.limit_key, str):
            raise MalformedRecord("limit_key is not a string")
        if self.limit_concurrency is not None:
            self.limit_concurrency = int(self.limit_concurrency)
        if self.limit_interval is not None:
            self.limit_interval = float(self.limit_interval)
        if self.limit_burst is not None:
            self.limit_burst = int(self.limit_burst)
        if self.history is None:
            self.history = []
        if not isinstance(self.history, list) or not all(isinstance(e, dict) for e in self.history):
            raise MalformedRecord("history is not a list of attempt entries")
        self.history_dropped = int(self.history_dropped or 0)
        if self.parents is not None and (not isinstance(self.parents, list)
                                         or not all(isinstance(p, str) for p in self.parents)):
            raise MalformedRecord("parents is not a list of job ids")

    def claim_by(self, worker_id: str, now: float, lease: float) -> None:
        """Turn a pending record into one ``worker_id`` runs under a fresh lease.

        The field rules of :meth:`Persistence.claim` in one place, for backends
        that read-modify-write (scripts on the server spell out the same rules).
        """
        self.state, self.owner, self.lease_until = RUNNING, worker_id, now + lease
        self.token += 1
        self.attempts += 1
        self.started = now
        self.kill_requested = False

    @property
    def finished_state(self) -> bool:
        return self.state in FINISHED_STATES


_FIELDS = tuple(f.name for f in dataclasses.fields(JobRecord))
_REQUIRED = ("id", "queue", "route", "func", "payload", "state")


@dataclass
class Outcome:
    """A state change that :meth:`Persistence.finish` applies in one atomic step.

    The core decides what happens to a job (complete, retry later, dead-letter);
    backends only apply the change, so every backend follows the same policy.
    """

    state: State
    result: bytes | None = None
    error: dict[str, str] | None = None
    due: float | None = None        # for PENDING: when the job may run again
    dead: bool = False
    attempts: int | None = None     # set to reset the attempt counter (dead-letter retry)
    finished: float | None = None
    # The history entry of the attempt this outcome ends (attempt_entry; the store adds "finished"),
    # or None when no attempt ends (a hand-back, a requeue, a kill before the job ran).
    attempt: dict[str, Any] | None = None
    # ``due`` was read from the record (a hand-back's: the due it had), so it is on the store's
    # clock already: kept as it is. Otherwise it is on the caller's clock, and a store with a clock
    # of its own moves it by the difference beyond CLOCK_TOLERANCE, as it moves an enqueue's times.
    due_from_store: bool = False

    def ending(self, record: JobRecord, how: str | None = None) -> Outcome:
        """This outcome, ending ``record``'s current attempt: with its history entry (``how`` it ended;
        by default complete, killed or error as the state says)."""
        if how is None:
            how = self.state if self.state in (COMPLETE, KILLED) else ERROR
        return dataclasses.replace(self, attempt=attempt_entry(record, how, self.error))

    def apply_to(self, record: JobRecord, now: float) -> JobRecord:
        """Return a copy of ``record`` with this outcome applied.

        Backends that read-modify-write (SQLite, transactions) use this so the
        field rules live in one place.

        A kill request outranks every way back to the queue (a retry, a
        hand-back of a prefetched job, a lost lease): a ``pending`` outcome
        on a record whose kill was requested ends it ``killed`` instead, so a
        job never runs again once ``kill`` has returned.
        """
        if self.state == PENDING and record.kill_requested:
            return Outcome(KILLED, error=dict(KILLED_BY_REQUEST), attempts=self.attempts,
                           attempt=self.attempt).apply_to(record, now)
        # A shallow copy, as dataclasses.replace makes, without running __init__ field by field
        # (a fifth of SQLite's Python per finish).
        updated = copy.copy(record)
        if self.attempt is not None:
            updated.history, dropped = appended(record.history, {**self.attempt, "finished": now})
            updated.history_dropped = record.history_dropped + dropped
        updated.state = self.state
        updated.owner = None
        updated.lease_until = None
        updated.kill_requested = False
        updated.dead = self.dead
        if self.attempts is not None:
            updated.attempts = self.attempts
        if self.state == PENDING:
            updated.due = self.due if self.due is not None else now
            updated.result = None
            updated.error = self.error  # the last failure stays visible while waiting
            updated.finished = None
        else:
            updated.result = self.result
            updated.error = self.error
            updated.finished = self.finished if self.finished is not None else now
        return updated


def _clip_head(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _clip_tail(text: str, limit: int) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]


def worker_address(worker_id: str | None) -> tuple[str | None, int | None]:
    """(host, pid) of a worker id as workers make them (``host:pid:route:nonce``); Nones if it is not one."""
    host, _, rest = (worker_id or "").partition(":")
    pid, _, _ = rest.partition(":")
    return (host, int(pid)) if host and pid.isdigit() else (None, None)


def attempt_entry(record: JobRecord, how: str, error: Mapping[str, str] | None) -> dict[str, Any]:
    """The history entry of ``record``'s current attempt ending ``how`` (one of ATTEMPT_OUTCOMES).

    Plain JSON: ``attempt`` (its number), ``worker``, ``host``, ``pid``, ``started``, ``outcome``,
    ``error_type``, ``message``, ``traceback``; the store adds ``finished`` (its clock) when it
    applies the finish. Message and traceback are clipped (ATTEMPT_MESSAGE_CHARS, ATTEMPT_TRACEBACK_CHARS).
    """
    if how not in ATTEMPT_OUTCOMES:
        raise ValueError(f"an attempt ends {' or '.join(ATTEMPT_OUTCOMES)}, not {how!r}")
    host, pid = worker_address(record.owner)
    err = error or {}
    return {"attempt": record.attempts, "worker": record.owner, "host": host, "pid": pid,
            "started": record.started, "outcome": how,
            "error_type": str(err["type"]) if err.get("type") else None,
            "message": _clip_head(str(err.get("message") or ""), ATTEMPT_MESSAGE_CHARS),
            "traceback": _clip_tail(str(err.get("traceback") or ""), ATTEMPT_TRACEBACK_CHARS)}


def appended(history: list[dict[str, Any]] | None, entry: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """``history`` with ``entry`` added, cut to its last HISTORY_LIMIT entries; and how many were cut."""
    longer = [*(history or []), entry]
    dropped = max(0, len(longer) - HISTORY_LIMIT)
    return longer[dropped:], dropped


@dataclass
class WorkerInfo:
    """A live worker as the registry knows it."""

    id: str
    queue: str
    route: str
    host: str
    pid: int
    state: str = "idle"             # idle | busy | stopping
    started: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    concurrency: int = 1            # async jobs it runs at once (--async-concurrency)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkerInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        info = cls(**{k: v for k, v in data.items() if k in names})
        info.concurrency = int(info.concurrency or 1)  # stores that keep text give it back as text
        return info
