"""Records to and from Redis hashes, and the packed strings the scripts exchange.

Records travel to and from the scripts as one string of ``<length>:<bytes>``
items: redis-py packs and parses each protocol element in Python, so one string
per record (or per batch) costs a fraction of one element per field.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

from skunkqueue.errors import MalformedRecord
from skunkqueue.record import JobRecord

_STR = ("id", "queue", "route", "func", "serializer", "state", "target", "owner", "key", "on_failure", "workflow",
        "limit_key")
_BYTES = ("payload", "result")
_FLOAT = ("due", "created", "retry_backoff", "timeout", "lease_until", "started", "finished", "result_ttl",
          "limit_interval")
_INT = ("attempts", "retries", "token", "history_dropped", "priority", "limit_concurrency", "limit_burst")
_BOOL = ("kill_requested", "dead")
_JSON = ("error", "parents", "inputs")  # parents: the scripts read it too (cjson)
# The attempts' entries, packed as "<length>:<json>" items (finish.lua appends and drops without decoding).
_PACKED_JSON = ("history",)


def _decode_value(name: str, raw: bytes) -> Any:
    if name in _BYTES:
        return raw
    text = raw.decode()
    if name in _FLOAT:
        return float(text)
    if name in _INT:
        return int(text)
    if name in _BOOL:
        return text == "1"
    if name in _JSON:
        return json.loads(text)
    if name in _PACKED_JSON:
        return [json.loads(item) for item in unpack_items(raw)]
    return text


_DECODERS: dict[bytes, str] = {
    name.encode(): name for name in (*_STR, *_BYTES, *_FLOAT, *_INT, *_BOOL, *_JSON, *_PACKED_JSON)
}


def text(raw: Any) -> str:
    """A key or member as text (the client returns bytes: decode_responses is off)."""
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def decode_record(flat: dict[bytes, bytes] | Sequence[bytes], job_id: str = "?") -> JobRecord:
    """A record from HGETALL's answer (a dict, or the flat list a script returns)."""
    pairs: Iterable[tuple[bytes, bytes]]
    if isinstance(flat, dict):
        pairs = flat.items()
    else:
        pairs = zip(flat[::2], flat[1::2])
    data: dict[str, Any] = {}
    try:
        for key, raw in pairs:
            name = _DECODERS.get(key)
            if name is not None:
                data[name] = _decode_value(name, raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedRecord(f"record {job_id!r} has an unreadable field: {exc}") from None
    if data.get("error") is not None and not isinstance(data["error"], dict):
        raise MalformedRecord(f"record {job_id!r}: error is not an object")
    return JobRecord.from_dict(data)


# Fields left out while they hold their zero value: a fresh record is then ten
# fields, and the scripts read a missing token or attempts as 0.
_OMIT_ZERO: dict[str, Any] = {"token": 0, "attempts": 0, "retries": 0, "kill_requested": False, "dead": False,
                              "history": [], "history_dropped": 0, "priority": 0}


def encode_record(record: JobRecord) -> dict[str, bytes]:
    """The record as hash fields; None (and a zero counter) is the absence of the field."""
    out: dict[str, bytes] = {}
    for name, value in vars(record).items():
        if value is None or (name in _OMIT_ZERO and value == _OMIT_ZERO[name]):
            continue
        if name in _BYTES:
            out[name] = bytes(value)
        elif name in _FLOAT:
            out[name] = repr(float(value)).encode()  # repr round-trips a float exactly
        elif name in _BOOL:
            out[name] = b"1" if value else b"0"
        elif name in _JSON:
            out[name] = json.dumps(value).encode()
        elif name in _PACKED_JSON:
            out[name] = pack_items(json.dumps(item).encode() for item in value)
        else:
            out[name] = str(value).encode()
    return out


def pack_items(items: Iterable[bytes]) -> bytes:
    return b"".join(b"%d:%s" % (len(item), item) for item in items)


_NAME_ITEMS = {name: b"%d:%s" % (len(name), name.encode()) for name in _DECODERS.values()}


_KIND = {**dict.fromkeys(_BYTES, 1), **dict.fromkeys(_FLOAT, 2), **dict.fromkeys(_BOOL, 3),
         **dict.fromkeys(_JSON, 4), **dict.fromkeys(_PACKED_JSON, 5)}  # else 0: str(value)
_KEEP = object()


def pack_record(record: JobRecord) -> bytes:
    """encode_record, packed as name/value items; on the enqueue hot path (once per fire), hence one
    pass with no dict or generator in between (a test checks it against encode_record)."""
    parts: list[bytes] = []
    for name, value in vars(record).items():
        if value is None or value == _OMIT_ZERO.get(name, _KEEP):
            continue
        kind = _KIND.get(name, 0)
        if kind == 0:
            raw = str(value).encode()
        elif kind == 1:
            raw = bytes(value)
        elif kind == 2:
            raw = repr(float(value)).encode()
        elif kind == 3:
            raw = b"1" if value else b"0"
        elif kind == 4:
            raw = json.dumps(value).encode()
        else:
            raw = pack_items(json.dumps(item).encode() for item in value)
        parts += (_NAME_ITEMS[name], b"%d:" % len(raw), raw)
    return b"".join(parts)


def unpack_items(blob: bytes) -> list[bytes]:
    """The items packed by pack_items."""
    out: list[bytes] = []
    pos, end = 0, len(blob)
    while pos < end:
        colon = blob.index(b":", pos)
        pos = colon + 1 + int(blob[pos:colon])
        if pos > end:
            raise ValueError("a packed item runs past the end")
        out.append(blob[colon + 1:pos])
    return out


def unpack_fields(blob: bytes) -> dict[bytes, bytes]:
    """Name/value pairs packed by pack_items (or by the scripts' pack())."""
    out: dict[bytes, bytes] = {}
    pos, end, find = 0, len(blob), blob.find
    while pos < end:
        colon = find(b":", pos)
        stop = colon + 1 + int(blob[pos:colon])
        name = blob[colon + 1:stop]
        colon = find(b":", stop)
        pos = colon + 1 + int(blob[stop:colon])
        out[name] = blob[colon + 1:pos]
    return out


def num(value: float) -> str:
    return repr(float(value))


def opt(value: bytes | str | None) -> bytes:
    """An optional script argument: empty means None, else a '.' then the value."""
    if value is None:
        return b""
    return b"." + (value.encode() if isinstance(value, str) else value)
