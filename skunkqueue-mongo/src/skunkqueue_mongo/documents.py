"""How a record is a MongoDB document, and the few rules both clients (sync and asyncio) apply to documents.

Shared by :mod:`skunkqueue_mongo.persistence` and :mod:`skunkqueue_mongo.aio`,
which stand on it; neither imports the other's helpers.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

from pymongo.errors import AutoReconnect, BulkWriteError

from skunkqueue import dependencies
from skunkqueue.persistence import CLOCK_TOLERANCE
from skunkqueue.record import JobRecord

DUPLICATE_KEY = 11000
# Rounds of insert, find the holder, drop an expired holder, before enqueue_keyed gives up.
KEY_ROUNDS = 20


def date(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=timezone.utc)


def not_expired(now: float) -> dict[str, Any]:
    # The TTL monitor lags up to a minute; a record past expire_at is gone as far as callers know.
    return {"expire_at": {"$not": {"$lte": date(now)}}}


def aware(when: datetime) -> datetime:
    """pymongo returns naive UTC datetimes unless the client asks for tz-aware ones."""
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def on_key_index(error: Mapping[str, Any]) -> bool:
    """Whether a bulk write error is a duplicate in the ``key`` index (not of an ``_id``)."""
    if error.get("code") != DUPLICATE_KEY:
        return False
    pattern = error.get("keyPattern")
    if isinstance(pattern, Mapping):
        return "key" in pattern
    return " index: key dup key" in str(error.get("errmsg", ""))


def on_id_index(error: Mapping[str, Any] | None) -> bool:
    """Whether a write error is a duplicate ``_id``: the record is stored already (sent again)."""
    if not error or error.get("code") != DUPLICATE_KEY:
        return False
    pattern = error.get("keyPattern")
    if isinstance(pattern, Mapping):
        return list(pattern) == ["_id"]
    return " index: _id_ dup key" in str(error.get("errmsg", ""))


def to_doc(record: JobRecord) -> dict[str, Any]:
    doc = record.to_dict()
    doc["_id"] = doc.pop("id")
    return doc


def shift_from(server_now: float) -> float:
    moved = server_now - time.time()
    return moved if abs(moved) > CLOCK_TOLERANCE else 0.0


def docs(records: Sequence[JobRecord], moved: float) -> list[dict[str, Any]]:
    """The records as documents, their times moved by ``moved`` seconds onto the server's clock."""
    docs = [to_doc(record) for record in records]
    for doc in docs:
        if moved:
            for name in ("due", "created", "started", "finished", "lease_until"):
                if isinstance(doc.get(name), (int, float)) and doc[name] < dependencies.WAITING_DUE:
                    doc[name] += moved
    return docs


def refused_by_key(exc: BulkWriteError, attempts: int) -> tuple[list[int], list[int]]:
    """The positions an unordered ``insert_many`` refused because their key is held, and those
    refused because their ``_id`` is stored already; raises for any other failure.

    A stored ``_id`` is the same record sent again (ids are new per fire), maybe after a lost
    reply: it is left as it is, and the rest of the batch went in (unordered, so the server
    tried every document). A worker may be running it, so it must not be written again.
    """
    errors = exc.details.get("writeErrors", [])
    held = [e for e in errors if on_key_index(e)]
    stored = [e for e in errors if on_id_index(e)]
    others = [e for e in errors if not on_key_index(e) and not on_id_index(e)]
    # A repeat of an interrupted insert finds the records that made
    # it the first time: they are stored, which is what we wanted.
    # (A keyed one that made it finds itself as its key's holder.)
    repeated = attempts > 1 and all(e.get("code") == DUPLICATE_KEY for e in others)
    if others and not repeated:
        raise exc
    concern = exc.details.get("writeConcernErrors")
    if concern:
        # Written, but not acknowledged as durable (the server is
        # shutting down or stepping down): the same as a lost reply.
        raise AutoReconnect(f"write concern failed: {concern[0].get('errmsg')}") from None
    return sorted(e["index"] for e in held), sorted(e["index"] for e in stored)


def holder_expired(holder: Mapping[str, Any], server_now: float) -> bool:
    """Whether a key's holder is past its expiry, waiting for the TTL monitor (gone, as far as get() goes)."""
    expire_at = holder.get("expire_at")
    return isinstance(expire_at, datetime) and aware(expire_at) <= date(server_now)


def to_record(doc: Mapping[str, Any]) -> JobRecord:
    data = dict(doc)
    data["id"] = data.pop("_id", None)
    return JobRecord.from_dict(data)
