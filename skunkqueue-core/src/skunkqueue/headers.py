"""Headers: small string metadata a producer attaches to a record (e.g. a trace context).

They travel inside the payload, in front of the encoded arguments::

    [signature] skunq-h1:{"traceparent":"00-..."}\\n <encoded arguments>

so every backend stores and returns them untouched (a backend never looks
inside a payload), and, when records are signed, the signature covers them:
a writer without the key cannot attach a job to someone else's trace. Plugins
set them through the ``job_sending`` hook and read them with :func:`of`.
"""

from __future__ import annotations

import json
from typing import Mapping

from skunkqueue import signing
from skunkqueue.errors import SerializationError
from skunkqueue.record import JobRecord

_PREFIX = b"skunq-h1:"
_END = b"\n"  # JSON as json.dumps writes it never holds a raw newline


def wrap(headers: Mapping[str, str], body: bytes) -> bytes:
    """``body`` (the encoded arguments) with ``headers`` in front; unchanged when there are none."""
    if not headers:
        return body
    clean = {str(name): str(value) for name, value in headers.items()}
    return _PREFIX + json.dumps(clean, separators=(",", ":")).encode() + _END + body


def split(body: bytes) -> tuple[dict[str, str], bytes]:
    """The headers and the encoded arguments of an (unsigned) payload body."""
    if not body.startswith(_PREFIX):
        return {}, body
    end = body.find(_END, len(_PREFIX))
    try:
        if end < 0:
            raise ValueError("no end of headers")
        value = json.loads(body[len(_PREFIX):end])
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ValueError("not an object of strings")
    except ValueError as exc:
        raise SerializationError(f"The stored job headers are unreadable: {exc}.") from None
    return value, body[end + 1:]


def arguments(payload: bytes) -> bytes:
    """The encoded arguments of a stored payload: without signature or headers."""
    return split(signing.body(payload))[1]


def of(record: JobRecord) -> dict[str, str]:
    """The headers a record carries ({} when none, or when they are unreadable).

    Trust them only as far as the record: with ``SKUNQ_SECRET`` set, only
    after the worker verified its signature (``job_started`` comes after that).
    """
    try:
        return split(signing.body(record.payload))[0]
    except SerializationError:
        return {}


def trusted(record: JobRecord) -> dict[str, str]:
    """:func:`of`, as far as a worker that checked the record's signature may trust it.

    A worker with a key that runs unsigned records too (``SKUNQ_ACCEPT_UNSIGNED``, during a
    roll-out) gets {} for an unsigned one: whoever wrote it need not hold the key.
    """
    if signing.key_from_env() is not None and signing.body(record.payload) == record.payload:
        return {}
    return of(record)


def trace_id(record: JobRecord) -> str | None:
    """The trace id of the W3C ``traceparent`` header, if the record carries a well-formed one
    (and, as :func:`trusted` says, may be trusted)."""
    parts = trusted(record).get("traceparent", "").split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and parts[1] != "0" * 32:
        try:
            int(parts[1], 16)
        except ValueError:
            return None
        return parts[1].lower()
    return None
