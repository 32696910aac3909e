"""HMAC-signed records (``SKUNQ_SECRET``): a store writer without the key gets nothing run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from skunkqueue import SkunkQueue, signing
from skunkqueue.cli import main
from skunkqueue.errors import PayloadTooLarge
from skunkqueue.persistence.sqlite import SQLitePersistence
from skunkqueue.record import COMPLETE, ERROR, JobRecord, new_id
from skunkqueue.testing import jobs
from skunkqueue.worker import Worker, WorkerConfig


def run_all(db: Path, queue: str, route: str = "r") -> None:
    worker = Worker(WorkerConfig(queue=queue, route=route, url=str(db)))
    worker.backend = worker.config.open()
    try:
        while claimed := worker.backend.claim(route, worker.id, 30, limit=10):
            for record in claimed:
                worker.execute(record)
    finally:
        worker.backend.close()


def test_only_records_signed_with_the_key_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "q.db"
    monkeypatch.setenv("SKUNQ_SECRET", "the right key")
    queue = SkunkQueue("signed", conn_url=str(db))
    mark, fail = queue.event(routes=["r"])(jobs.mark.func), queue.event(routes=["r", "s"])(jobs.fail.func)
    log = tmp_path / "executions"
    good = [mark.fire(str(log), f"good-{i}") for i in range(5)]
    template = queue.get(good[0].id)
    assert template is not None and template.payload.startswith(b"skunq-hmac1:")

    def forged(**changes: object) -> JobRecord:
        # A new id: the signature binds the id too, so even an unchanged copy is refused.
        return dataclasses.replace(template, id=new_id(), **changes)  # type: ignore[arg-type]

    body = signing.body(template.payload)
    unsigned = forged(payload=body)
    wrong_key = forged(payload=body)
    signing.sign(b"another key", wrong_key)
    # A genuine signature (template's) moved onto other fields: another id, function, route or arguments.
    moved = forged()
    other_func = forged(func=fail.name)
    other_route = forged(route="s")
    other_args = forged(payload=template.payload.replace(b"good-0", b"evil-0"))
    tampered = [unsigned, wrong_key, moved, other_func, other_route, other_args]
    store = SQLitePersistence("signed", url=str(db))
    store.enqueue(tampered)
    run_all(db, "signed")
    run_all(db, "signed", "s")
    assert all(h.state == COMPLETE for h in good)
    for record in tampered:
        done = store.get(record.id)
        assert done is not None and done.state == ERROR and done.error is not None, record
        assert "nothing of it ran" in done.error["message"] and done.attempts == 1, done.error
    assert sorted(line.split()[0] for line in log.read_text().splitlines()) == [f"good-{i}" for i in range(5)]
    store.close()


def test_a_worker_without_the_key_still_runs_signed_records(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "q.db"
    monkeypatch.setenv("SKUNQ_SECRET", "k")
    queue = SkunkQueue("mixed", conn_url=str(db))
    add = queue.event(routes=["r"])(jobs.add.func)
    handle = add.fire(2, 3)
    monkeypatch.delenv("SKUNQ_SECRET")
    run_all(db, "mixed")
    assert handle.result == 5
    shown = json.loads(CliRunner().invoke(main, ["job", handle.id, "-q", "mixed", "--url", str(db),
                                                 "--json"]).output)
    assert shown["signed"] is True and shown["arguments"] == {"args": [2, 3], "kwargs": {}}


def test_unsigned_records_are_refused_by_a_worker_with_the_key(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "q.db"
    queue = SkunkQueue("plain", conn_url=str(db))
    add = queue.event(routes=["r"])(jobs.add.func)
    handle = add.fire(2, 3)  # no SKUNQ_SECRET in the producer
    monkeypatch.setenv("SKUNQ_SECRET", "k")
    run_all(db, "plain")
    assert handle.state == ERROR and "is not signed" in (handle.error or {}).get("message", "")


def test_the_signature_counts_against_the_payload_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKUNQ_SECRET", "k")
    monkeypatch.setattr(SQLitePersistence, "max_payload", 100)
    add = SkunkQueue("big", conn_url=str(tmp_path / "q.db")).event(routes=["r"])(jobs.add.func)
    fits_unsigned = "x" * (100 - len('[["",1],{}]'))
    with pytest.raises(PayloadTooLarge, match=f"encode to {100 + signing.overhead()} bytes"):
        add.fire(fits_unsigned, 1)
