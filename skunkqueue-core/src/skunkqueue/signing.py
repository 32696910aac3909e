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

Rotation: ``SKUNQ_SECRET_PREVIOUS`` holds keys that verify but never sign (one
or more, separated by spaces or commas, so no key may contain either), so
records signed with the old key still run while producers move to the new
one. Roll-out: ``SKUNQ_ACCEPT_UNSIGNED=1`` makes a worker with a key run
unsigned records too (a record that carries a signature must still verify).
docs/guides/signing.md ("Rolling out signing", "Rotating the key") has the procedures.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os

from skunkqueue.errors import ConfigurationError, JobRefused
from skunkqueue.record import JobRecord

SECRET_ENV = "SKUNQ_SECRET"
PREVIOUS_ENV = "SKUNQ_SECRET_PREVIOUS"
ACCEPT_UNSIGNED_ENV = "SKUNQ_ACCEPT_UNSIGNED"
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


def previous_keys_from_env() -> list[bytes]:
    """The verify-only keys from ``SKUNQ_SECRET_PREVIOUS`` (spaces or commas between keys)."""
    text = os.environ.get(PREVIOUS_ENV, "")
    try:
        return [k.encode("utf-8") for k in text.replace(",", " ").split()]
    except UnicodeEncodeError:
        raise ConfigurationError(f"{PREVIOUS_ENV} cannot be encoded as UTF-8; use printable text.") from None


def verify_keys_from_env() -> list[bytes]:
    """Every key a worker accepts: ``SKUNQ_SECRET`` first, then ``SKUNQ_SECRET_PREVIOUS``.

    Previous keys without a current one are a mistake (nothing would sign what they
    verify after the rotation): ConfigurationError.
    """
    current, previous = key_from_env(), previous_keys_from_env()
    if previous and current is None:
        raise ConfigurationError(f"{PREVIOUS_ENV} is set but {SECRET_ENV} is not: set the new key in "
                                 f"{SECRET_ENV} and keep the old ones in {PREVIOUS_ENV}.")
    return ([current] if current else []) + [k for k in previous if k != current]


def accepts_unsigned() -> bool:
    """``SKUNQ_ACCEPT_UNSIGNED``: a worker with a key runs unsigned records too (during a roll-out)."""
    return os.environ.get(ACCEPT_UNSIGNED_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def key_id(key: bytes) -> str:
    """A public name for a key: reveals nothing of it, tells two keys apart."""
    return hmac.new(key, b"skunkqueue key id", hashlib.sha256).hexdigest()[:16]


def signed_with(keys: list[bytes], record: JobRecord) -> bytes | None:
    """The key among ``keys`` whose signature ``record`` carries, or None."""
    payload = record.payload
    if not payload.startswith(_PREFIX) or payload[overhead() - 1:overhead()] != b":":
        return None
    claimed = payload[len(_PREFIX):overhead() - 1].decode("ascii", "replace")
    for key in keys:
        if hmac.compare_digest(claimed, _digest(key, record, payload[overhead():])):
            return key
    return None


def signature(record: JobRecord) -> str:
    """How ``record`` is signed, judged with this process's keys: ``none`` (unsigned), ``current``
    (``SKUNQ_SECRET``), ``previous`` (a ``SKUNQ_SECRET_PREVIOUS`` key) or ``unknown`` (another key,
    altered, or no key here to tell). A rotation is over when no job says ``previous``."""
    if body(record.payload) == record.payload:
        return "none"
    current, previous = key_from_env(), previous_keys_from_env()
    if current is not None and signed_with([current], record):
        return "current"
    if previous and signed_with(previous, record):
        return "previous"
    return "unknown"


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


def verify(key: bytes | list[bytes] | None, record: JobRecord, *, accept_unsigned: bool = False) -> None:
    """Raise JobRefused unless ``record`` carries a valid signature by ``key`` (or one of the keys:
    the current one and the previous ones). No key: no-op. ``accept_unsigned``: an unsigned record
    passes, a signed one must still verify."""
    keys = [key] if isinstance(key, bytes) else list(key or [])
    if not keys:
        return
    payload = record.payload
    if not payload.startswith(_PREFIX) or payload[overhead() - 1:overhead()] != b":":
        if accept_unsigned:
            return
        raise JobRefused(f"Job {record.id} is not signed, and this worker ({SECRET_ENV} set) runs only "
                         "signed jobs; nothing of it ran.")
    if signed_with(keys, record) is None:
        raise JobRefused(f"Job {record.id} has a bad signature (another key, or the record was altered "
                         "after signing); nothing of it ran.")
