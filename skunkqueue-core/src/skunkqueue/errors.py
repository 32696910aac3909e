"""Exceptions that SkunkQueue raises to its users.

Every error a user can cause carries a message that says what to do about it;
the CLI prints ``str(error)`` without a traceback.
"""

from __future__ import annotations


class SkunkQueueError(Exception):
    """Base class of every error SkunkQueue raises on purpose."""


class ConfigurationError(SkunkQueueError):
    """A queue, worker or backend was configured wrongly."""


class BackendNotFound(ConfigurationError):
    """No installed backend answers to the requested name."""


class BackendUnavailable(SkunkQueueError):
    """The backend's server could not be reached (after retrying)."""


class RecordHeld(BackendUnavailable):
    """One record is held for now by another operation (e.g. a transaction a dead worker left open
    on MongoDB, until the server aborts it); the store is up, and the write can be tried again later."""


class SerializationError(SkunkQueueError):
    """Arguments or a result cannot be encoded with the queue's serializer."""


class PayloadTooLarge(SkunkQueueError):
    """A job's encoded arguments exceed what the backend can store."""


class MalformedRecord(SkunkQueueError):
    """A record in the store is not a job SkunkQueue can read."""


class JobRefused(SkunkQueueError):
    """A record names a function this worker must not run (or must not import to find)."""


class JobNotFound(SkunkQueueError, LookupError):
    """``queue.handle(job_id)`` names no job of this queue (never fired, expired or purged)."""


class InvalidArguments(SkunkQueueError, TypeError):
    """``fire`` was given arguments the job's function cannot take."""


class JobFailed(SkunkQueueError):
    """Raised by ``JobHandle.wait()`` when the job ended in ``error`` or ``killed``.

    ``remote_traceback`` is the traceback text recorded by the worker.
    """

    def __init__(self, message: str, *, job_id: str, state: str,
                 error_type: str | None = None, remote_traceback: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.state = state
        self.error_type = error_type
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        base = super().__str__()
        if self.remote_traceback:
            return f"{base}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"
        return base


class JobTimeout(SkunkQueueError, TimeoutError):
    """``JobHandle.wait(timeout=...)`` ran out before the job finished."""


class JobKilled(BaseException):
    """Raised inside a running job to interrupt it (rough shutdown, kill, time limit).

    It derives from BaseException so that a job's own ``except Exception`` does
    not swallow the interruption.
    """

    def __init__(self, reason: str = "killed") -> None:
        super().__init__(reason)
        self.reason = reason


class KillRequested(JobKilled):
    """Someone called ``kill`` on the running job: it ends ``killed``."""


class RoughStop(JobKilled):
    """The pool was stopped roughly (SIGINT): the job ends ``killed``."""


class TimeLimit(JobKilled):
    """The job ran past its ``timeout``: the attempt ends ``error`` with ``TimeoutError``."""


class LeaseLost(JobKilled):
    """Another worker owns the job now: stop and record nothing."""
