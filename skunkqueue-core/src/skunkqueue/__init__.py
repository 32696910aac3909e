"""SkunkQueue: task scheduling for humans who use Python."""

from __future__ import annotations

from skunkqueue.context import JobContext, current_job
from skunkqueue.errors import (
    BackendNotFound,
    BackendUnavailable,
    ConfigurationError,
    InvalidArguments,
    JobFailed,
    JobNotFound,
    JobRefused,
    JobTimeout,
    MalformedRecord,
    PayloadTooLarge,
    RecordHeld,
    SerializationError,
    SkunkQueueError,
)
from skunkqueue.flow import Limit
from skunkqueue.hooks import hookimpl
from skunkqueue.job import Job, JobHandle
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import COMPLETE, ERROR, KILLED, PENDING, RUNNING
from skunkqueue.workflow import WorkflowHandle, chain, group

__all__ = [
    "COMPLETE",
    "ERROR",
    "KILLED",
    "PENDING",
    "RUNNING",
    "BackendNotFound",
    "BackendUnavailable",
    "ConfigurationError",
    "InvalidArguments",
    "Job",
    "JobContext",
    "JobFailed",
    "JobHandle",
    "JobNotFound",
    "JobRefused",
    "JobTimeout",
    "Limit",
    "MalformedRecord",
    "PayloadTooLarge",
    "RecordHeld",
    "SerializationError",
    "SkunkQueue",
    "SkunkQueueError",
    "WorkflowHandle",
    "chain",
    "current_job",
    "group",
    "hookimpl",
]
