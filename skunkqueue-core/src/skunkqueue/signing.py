"""Optional HMAC signing of records: with ``SKUNQ_SECRET`` set, store writers without the key get nothing run.

The producer signs each record it enqueues with HMAC-SHA256 over the fields
that decide what runs (id, queue, route, target, function, serializer) and the
encoded arguments. The signature travels in front of the payload, so every
backend stores it without knowing about it. A worker whose environment has
``SKUNQ_SECRET`` checks the signature before it looks the function up, imports
anything or decodes the arguments; a record that is unsigned, signed with
another key or altered after signing ends ``error`` and nothing of it runs.

It stops forgery, not replay: a writer can still put back a copy of a record
that a key holder signed earlier (same function, same arguments).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

from skunkqueue.errors import ConfigurationError, JobRefused
from skunkqueue.record import JobRecord

SECRET_ENV = "SKUNQ_SECRET"
_PREFIX = b"skunq-hmac1:"
_DIGEST_HEX = 64


def key_from_env() -> bytes | None:
    """The signing key from ``SKUNQ_SECRET``, or None when signing is off."""
    secret = os.environ.get(SECRET_ENV)
    if not secret:
        return None
    try:
        return secret.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigurationError(f"{SECRET_ENV} cannot be encoded as UTF-8; use printable text.") from None


def _digest(key: bytes, record: JobRecord, body: bytes) -> str:
    fields = ["v1", record.id, record.queue, record.route, record.target, record.func, record.serializer]
    message = json.dumps(fields, separators=(",", ":")).encode() + b"\n" + body
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign(key: bytes, record: JobRecord) -> None:
    """Put the signature in front of ``record.payload`` (before it is enqueued)."""
    record.payload = _PREFIX + _digest(key, record, record.payload).encode() + b":" + record.payload


def overhead() -> int:
    """Bytes that signing adds to a payload."""
    return len(_PREFIX) + _DIGEST_HEX + 1


def body(payload: bytes) -> bytes:
    """The encoded arguments, without the signature if there is one."""
    if payload.startswith(_PREFIX):
        return payload[overhead():]
    return payload


def verify(key: bytes | None, record: JobRecord) -> None:
    """Raise JobRefused unless ``record`` carries a valid signature (no-op when ``key`` is None)."""
    if key is None:
        return
    payload = record.payload
    if not payload.startswith(_PREFIX) or payload[overhead() - 1:overhead()] != b":":
        raise JobRefused(f"Job {record.id} is not signed, and this worker ({SECRET_ENV} set) runs only "
                         "signed jobs; nothing of it ran.")
    claimed = payload[len(_PREFIX):overhead() - 1].decode("ascii", "replace")
    if not hmac.compare_digest(claimed, _digest(key, record, payload[overhead():])):
        raise JobRefused(f"Job {record.id} has a bad signature (another key, or the record was altered "
                         "after signing); nothing of it ran.")
