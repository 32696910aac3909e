"""Record headers (skunkqueue.headers): written only when a plugin fills them, damaged ones refused cleanly."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from skunkqueue import SkunkQueue, chain, headers, hookimpl, hooks
from skunkqueue.cli import main
from skunkqueue.errors import ConfigurationError
from skunkqueue.record import COMPLETE, ERROR, JobRecord, new_id
from skunkqueue.testing import jobs
from skunkqueue.worker import Worker, WorkerConfig


def run_all(queue: SkunkQueue) -> None:
    worker = Worker(WorkerConfig(queue=queue.name, route="r", url=queue.conn_url))
    worker.backend = worker.config.open()
    try:
        while claimed := worker.held or worker.backend.claim("r", worker.id, 30, limit=10):
            worker.held = []
            for record in claimed:
                worker.execute(record)
    finally:
        worker.backend.close()


class Stamp:
    """A plugin that puts a header on every record and sees what workers start."""

    def __init__(self) -> None:
        self.sent: list[tuple[list[str], BaseException | None]] = []
        self.started: list[dict[str, str]] = []

    @hookimpl
    def job_sending(self, records: list[JobRecord], headers: list[dict[str, str]]) -> None:
        for record, carrier in zip(records, headers):
            carrier["x-route"] = record.route
            carrier["x-odd"] = 'line\nbreak "quoted" {}:$.'

    @hookimpl
    def job_sent(self, records: list[JobRecord], error: BaseException | None) -> None:
        self.sent.append(([r.id for r in records], error))

    @hookimpl
    def job_started(self, record: JobRecord) -> None:
        self.started.append(headers.of(record))


@pytest.fixture
def stamp() -> Any:
    plugin = Stamp()
    hooks.plugin_manager().register(plugin)
    yield plugin
    hooks.plugin_manager().unregister(plugin)


def test_a_plugins_headers_reach_the_worker_and_leave_the_arguments_alone(tmp_path: Path, stamp: Stamp) -> None:
    queue = SkunkQueue("h", conn_url=str(tmp_path / "q.db"))
    add = queue.event(routes=["r"])(jobs.add.func)
    handles = add.fire_many([(1, 2), (3, 4)])
    run_all(queue)
    assert [h.result for h in handles] == [3, 7]
    assert stamp.sent == [([h.id for h in handles], None)]
    assert stamp.started == [{"x-route": "r", "x-odd": 'line\nbreak "quoted" {}:$.'}] * 2
    shown = json.loads(CliRunner().invoke(main, ["job", handles[0].id, "-q", "h", "--url",
                                                 str(tmp_path / "q.db"), "--json"]).output)
    assert shown["arguments"] == {"args": [1, 2], "kwargs": {}} and shown["headers"]["x-route"] == "r"


def test_without_a_plugin_no_header_is_written(tmp_path: Path) -> None:
    queue = SkunkQueue("h", conn_url=str(tmp_path / "q.db"))
    handle = queue.event(routes=["r"])(jobs.add.func).fire(1, 2)
    record = queue.get(handle.id)
    assert record is not None and record.payload == b"[[1,2],{}]"


@pytest.mark.parametrize("payload", [b"skunq-h1:{not json\n[[1,2],{}]", b"skunq-h1:[1]\n[[1,2],{}]",
                                     b'skunq-h1:{"a":1}\n[[1,2],{}]', b'skunq-h1:{"a":"no end"}[[1,2],{}]'])
def test_damaged_headers_end_the_job_with_one_clear_error(tmp_path: Path, payload: bytes) -> None:
    queue = SkunkQueue("h", conn_url=str(tmp_path / "q.db"))
    add = queue.event(routes=["r"])(jobs.add.func)  # kept: a declaration lives as long as its Job
    handle = add.fire(1, 2)
    template = queue.get(handle.id)
    assert template is not None
    damaged = dataclasses.replace(template, id=new_id(), payload=payload)
    queue.persistence.enqueue([damaged])
    run_all(queue)
    assert handle.state == COMPLETE, handle.error
    stored = queue.get(damaged.id)
    assert stored is not None and stored.state == ERROR and stored.error is not None
    assert stored.error["type"] == "SerializationError"
    assert "headers are unreadable" in stored.error["message"] and not stored.error["traceback"]
    assert headers.of(stored) == {}
    shown = CliRunner().invoke(main, ["job", damaged.id, "-q", "h", "--url", str(tmp_path / "q.db"), "--json"])
    assert shown.exit_code == 0 and "undecodable" in json.loads(shown.output)["arguments"]


FIRINGS = ["fire", "afire", "fire a key", "afire a key", "chain.fire", "chain.afire"]


@pytest.mark.parametrize("how", FIRINGS)
def test_the_producer_hooks_fire_the_same_way_on_every_path(tmp_path: Path, stamp: Stamp, how: str) -> None:
    """job_sending once before the store and job_sent once after it, with the stored ids: sync and
    async, plain and keyed (a repeated key names the holder), single jobs and workflows."""
    queue = SkunkQueue("h", conn_url=str(tmp_path / "q.db"))
    add = queue.event(routes=["r"])(jobs.add.func)
    key = "k {}:$." if "key" in how else None
    fired: list[Any] = []
    for _ in range(2 if key else 1):
        if how.startswith("chain"):
            flow = chain(add.s(1, 2), add.s(3))
            fired.append(flow.fire() if how == "chain.fire" else asyncio.run(flow.afire()))
        else:
            fired.append(add.fire(1, 2, key=key) if how.startswith("fire") else
                         asyncio.run(add.afire(1, 2, key=key)))
    run_all(queue)
    if how.startswith("chain"):
        [handle] = fired
        assert handle.wait(timeout=5) == 6
        assert [len(ids) for ids, _ in stamp.sent] == [2] and stamp.sent[0][1] is None
        assert len(stamp.started) == 2
    else:
        assert {h.id for h in fired} == {fired[0].id} and fired[0].result == 3
        assert [error for _, error in stamp.sent] == [None] * len(fired)
        assert stamp.sent[0][0] == [fired[0].id]  # the ids as stored (a held key: the holder's)
        assert stamp.started == [{"x-route": "r", "x-odd": 'line\nbreak "quoted" {}:$.'}]


def test_job_sent_hears_why_the_store_refused(tmp_path: Path, stamp: Stamp) -> None:
    queue = SkunkQueue("h", conn_url=str(tmp_path / "q.db"))
    add = queue.event(routes=["r"])(jobs.add.func)
    with pytest.raises(ConfigurationError):
        add.fire(1, 2, using=object())  # no connection of the store's: refused, nothing stored
    [(ids, error)] = stamp.sent
    assert len(ids) == 1 and isinstance(error, ConfigurationError)
    assert queue.persistence.counts() == {}
