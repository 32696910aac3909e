"""The enqueue hot path's packing (codec.pack_record) against the field rules of codec.encode_record."""

from __future__ import annotations

import time

import pytest

from skunkqueue.record import JobRecord, new_id
from skunkqueue_redis import codec


def _items(record: JobRecord) -> bytes:
    """What pack_record must give: encode_record's fields, each packed as name/value items."""
    return codec.pack_items(item for name, value in codec.encode_record(record).items()
                            for item in (name.encode(), value))


@pytest.mark.parametrize("record", [
    JobRecord(id=new_id(), queue="q", route="r", func="m:f", payload=b"[[1],{}]"),
    JobRecord(id=new_id(), queue="名前{}:$.", route="r{x}", func="m:f", payload=b"\x00\xff", due=time.time(),
              created=1.5, result_ttl=86400.0, retry_backoff=0.1, timeout=2, retries=3, priority=-4,
              key='["r", "k"]', target="w:1", limit_key="t{1}", limit_concurrency=2, limit_interval=1e-7),
    JobRecord(id=new_id(), queue="q", route="r", func="m:f", payload=b"", attempts=2, token=5, dead=True,
              kill_requested=False, error={"type": "E", "message": "ü"}, parents=["a", "b"], inputs={"x": 1},
              history=[{"attempt": 1}, {"attempt": 2, "s": "é"}], history_dropped=0, result=b"r"),
], ids=["fresh", "every-option", "finished"])
def test_pack_record_packs_what_encode_record_encodes(record: JobRecord) -> None:
    assert codec.pack_record(record) == _items(record)
    assert codec.decode_record(codec.unpack_items(codec.pack_record(record))) == record
