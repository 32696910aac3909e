"""The spans, with the real OpenTelemetry SDK and its in-memory exporter; producer and worker in this process."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import otel_jobs
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from skunkqueue import SkunkQueue, chain, group, headers, periodic, signing
from skunkqueue.record import COMPLETE, ERROR, new_id
from skunkqueue.worker import Worker, WorkerConfig
from skunkqueue_otel import SkunkQueueInstrumentor
from skunkqueue_otel.spans import DEAD_EVENT, PARENTS_HEADER, RETRY_EVENT


@pytest.fixture(scope="session")
def exporter() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # global: the job's own spans go there too
    return exporter


@pytest.fixture(params=["parent"])
def spans(exporter: InMemorySpanExporter, request: pytest.FixtureRequest) -> Iterator[InMemorySpanExporter]:
    exporter.clear()
    instrumentor = SkunkQueueInstrumentor()
    instrumentor.instrument(consumer_context=request.param)
    yield exporter
    instrumentor.uninstrument()


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[SkunkQueue]:
    q = SkunkQueue(f"otel-{uuid.uuid4().hex[:8]}", conn_url=str(tmp_path / "q.db"))
    yield q
    q.close()


def declare(queue: SkunkQueue, job: Any, routes: list[str] | None = None, **options: Any) -> Any:
    """The test module's job, declared on this test's queue (a worker runs only jobs declared on its own)."""
    return queue.event(routes=routes or ["r"], **options)(job.func)


def run_all(queue: SkunkQueue, route: str = "r") -> None:
    """Run every job due on ``route`` with an in-process worker, until none is left."""
    worker = Worker(WorkerConfig(queue=queue.name, route=route, url=queue.conn_url))
    worker.backend = worker.config.open()
    try:
        # execute() may claim the next jobs as it records an outcome (into worker.held).
        while claimed := worker.held or worker.backend.claim(route, worker.id, 30, limit=10):
            worker.held = []
            for record in claimed:
                worker.execute(record)
    finally:
        worker.backend.close()


def of_kind(exporter: InMemorySpanExporter, kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind == kind]


def hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.trace_id, "032x")


def test_the_consumer_span_of_a_job_is_a_child_of_its_producer_span(spans: InMemorySpanExporter,
                                                                     queue: SkunkQueue) -> None:
    traced = declare(queue, otel_jobs.traced)
    with trace.get_tracer("test").start_as_current_span("the request") as request:
        handle = traced.fire(7)
    run_all(queue)
    assert handle.state == COMPLETE
    [producer] = of_kind(spans, SpanKind.PRODUCER)
    [consumer] = of_kind(spans, SpanKind.CONSUMER)
    [inner] = [s for s in spans.get_finished_spans() if s.name == "inside the job"]
    destination = f"{queue.name}/r"
    assert producer.name == f"send {destination}" and consumer.name == f"process {destination}"
    # One trace from the request to the job's own span: request > send > process > inside the job.
    assert producer.parent is not None and producer.parent.span_id == request.get_span_context().span_id
    assert consumer.parent is not None and producer.context is not None
    assert consumer.parent.span_id == producer.context.span_id
    assert inner.parent is not None and consumer.context is not None
    assert inner.parent.span_id == consumer.context.span_id
    assert handle.result == hex_trace(producer) == hex_trace(consumer)
    for span, operation in ((producer, "send"), (consumer, "process")):
        attributes = dict(span.attributes or {})
        assert attributes["messaging.system"] == "skunkqueue"
        assert attributes["messaging.destination.name"] == destination
        assert attributes["messaging.operation.type"] == operation
        assert attributes["messaging.message.id"] == handle.id
        assert attributes["skunkqueue.job.function"] == "otel_jobs:traced"
    attributes = dict(consumer.attributes or {})
    assert attributes["skunkqueue.job.attempt"] == 1 and attributes["skunkqueue.job.token"] == 1
    assert attributes["skunkqueue.job.outcome"] == COMPLETE
    assert consumer.status.status_code == StatusCode.UNSET
    # The stored record carries the producer's context inside its payload.
    record = queue.get(handle.id)
    assert record is not None and headers.trace_id(record) == hex_trace(producer)


def test_a_retried_job_shows_one_span_per_attempt(spans: InMemorySpanExporter, queue: SkunkQueue) -> None:
    fails = declare(queue, otel_jobs.always_fails, retries=2, retry_backoff=0)
    handle = fails.fire(1)
    run_all(queue)
    assert handle.state == ERROR
    [producer] = of_kind(spans, SpanKind.PRODUCER)
    attempts = sorted(of_kind(spans, SpanKind.CONSUMER), key=lambda s: s.start_time or 0)
    assert [dict(s.attributes or {})["skunkqueue.job.attempt"] for s in attempts] == [1, 2, 3]
    assert {hex_trace(s) for s in attempts} == {hex_trace(producer)}
    for span in attempts:
        assert span.status.status_code == StatusCode.ERROR
        assert dict(span.attributes or {})["error.type"] == "ValueError"
        assert "exception" in [e.name for e in span.events]
    assert [[e.name for e in s.events if e.name in (RETRY_EVENT, DEAD_EVENT)] for s in attempts] == [
        [RETRY_EVENT], [RETRY_EVENT], [DEAD_EVENT]]


@pytest.mark.parametrize("spans", ["link"], indirect=True)
def test_link_mode_starts_a_trace_per_attempt_linked_to_the_producer(spans: InMemorySpanExporter,
                                                                      queue: SkunkQueue) -> None:
    traced = declare(queue, otel_jobs.traced)
    handle = traced.fire(1)
    run_all(queue)
    [producer] = of_kind(spans, SpanKind.PRODUCER)
    [consumer] = of_kind(spans, SpanKind.CONSUMER)
    assert consumer.parent is None and hex_trace(consumer) != hex_trace(producer)
    assert producer.context is not None
    assert [(link.context.trace_id, link.context.span_id) for link in consumer.links] == [
        (producer.context.trace_id, producer.context.span_id)]
    assert handle.result == hex_trace(consumer)


def span_ids(links: Any) -> set[int]:
    return {link.context.span_id for link in links}


def test_workflow_steps_link_to_their_parents_producer_spans(spans: InMemorySpanExporter,
                                                             queue: SkunkQueue) -> None:
    traced = declare(queue, otel_jobs.traced)
    handle = group(traced.s(1), traced.s(2)).then(traced.s()).fire()
    left, right, last = [h.id for h in handle.jobs]
    run_all(queue)
    assert handle.state == COMPLETE
    producers = {dict(s.attributes or {})["messaging.message.id"]: s for s in of_kind(spans, SpanKind.PRODUCER)}
    consumers = {dict(s.attributes or {})["messaging.message.id"]: s for s in of_kind(spans, SpanKind.CONSUMER)}
    parents = {producers[left].context.span_id, producers[right].context.span_id}  # type: ignore[union-attr]
    # The fan-in callback's send and process spans both link to each member's send span.
    assert span_ids(producers[last].links) == parents
    assert span_ids(consumers[last].links) == parents
    # Members without parents carry no link (and no header).
    assert not producers[left].links and not consumers[left].links
    assert PARENTS_HEADER not in headers.of(queue.get(left))  # type: ignore[arg-type]
    assert PARENTS_HEADER in headers.of(queue.get(last))  # type: ignore[arg-type]


def test_a_dependency_fired_by_an_earlier_call_is_linked_too(spans: InMemorySpanExporter,
                                                             queue: SkunkQueue) -> None:
    traced = declare(queue, otel_jobs.traced)
    parent = traced.fire(1)
    step = chain(traced.s(2), traced.s()).fire()
    report = traced.fire(3, after=[parent, step])
    run_all(queue)
    assert report.state == COMPLETE
    producers = {dict(s.attributes or {})["messaging.message.id"]: s for s in of_kind(spans, SpanKind.PRODUCER)}
    [consumer] = [s for s in of_kind(spans, SpanKind.CONSUMER)
                  if dict(s.attributes or {})["messaging.message.id"] == report.id]
    expected = {producers[parent.id].context.span_id,  # type: ignore[union-attr]
                producers[step.jobs[-1].id].context.span_id}  # type: ignore[union-attr]
    assert span_ids(consumer.links) == expected


def test_a_forged_parents_header_in_a_signed_record_links_nothing(spans: InMemorySpanExporter,
                                                                  queue: SkunkQueue,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(signing.SECRET_ENV, "the right key")
    traced = declare(queue, otel_jobs.traced)
    genuine = traced.fire(1)
    template = queue.get(genuine.id)
    assert template is not None
    victim_span = "00f067aa0ba902b7"  # a span of someone else's trace
    evil = {PARENTS_HEADER: f"00-4bf92f3577b34da6a3ce929d0e0e4736-{victim_span}-01"}
    signature = template.payload[:signing.overhead()]
    forged = dataclasses.replace(template, id=new_id(),
                                 payload=signature + headers.wrap(evil, headers.arguments(template.payload)))
    queue.persistence.enqueue([forged])
    run_all(queue)
    stored = queue.get(forged.id)
    assert stored is not None and stored.state == ERROR and genuine.state == COMPLETE
    assert stored.error is not None and stored.error["type"] == "JobRefused"
    linked = {link.context.span_id for span in spans.get_finished_spans() for link in span.links}
    assert int(victim_span, 16) not in linked


def test_fire_many_afire_and_several_routes_make_one_producer_span_per_record(
        spans: InMemorySpanExporter, queue: SkunkQueue) -> None:
    two_routes = declare(queue, otel_jobs.traced, routes=["r", "s"])
    handles = two_routes.fire_many([(1,), (2,)])
    handles.append(asyncio.run(two_routes.afire(3)))
    producers = of_kind(spans, SpanKind.PRODUCER)
    assert sorted(dict(s.attributes or {})["messaging.message.id"] for s in producers) == sorted(
        job_id for h in handles for job_id in h.ids)
    assert sorted(s.name for s in producers) == sorted([f"send {queue.name}/r", f"send {queue.name}/s"] * 3)
    run_all(queue, "r")
    run_all(queue, "s")
    by_id = {dict(s.attributes or {})["messaging.message.id"]: s for s in producers}
    for consumer in of_kind(spans, SpanKind.CONSUMER):
        producer = by_id[dict(consumer.attributes or {})["messaging.message.id"]]
        assert consumer.parent is not None and producer.context is not None
        assert consumer.parent.span_id == producer.context.span_id
    assert len(of_kind(spans, SpanKind.CONSUMER)) == 6


def test_a_key_already_held_points_the_producer_span_at_the_existing_job(spans: InMemorySpanExporter,
                                                                        queue: SkunkQueue) -> None:
    traced = declare(queue, otel_jobs.traced)
    first = traced.fire(1, key="once")
    second = traced.fire(2, key="once")
    assert first.id == second.id
    early, late = sorted(of_kind(spans, SpanKind.PRODUCER), key=lambda s: s.start_time or 0)
    assert dict(early.attributes or {})["skunkqueue.job.key"] == "once"
    assert "skunkqueue.job.duplicate" not in dict(early.attributes or {})
    assert dict(late.attributes or {})["skunkqueue.job.duplicate"] is True
    assert dict(late.attributes or {})["messaging.message.id"] == first.id


def test_a_periodic_slot_is_on_the_spans(spans: InMemorySpanExporter, queue: SkunkQueue) -> None:
    ticking = queue.periodic(routes=["r"], every=300)(otel_jobs.every_slot)
    assert ticking.schedule is not None
    slot = float(int(time.time()) // 300 * 300)  # the latest slot: due now
    ticking._fire([((), {})], slot, [ticking.schedule.key(periodic.micros(slot))])  # as the pool's scheduler
    run_all(queue)
    fired = of_kind(spans, SpanKind.PRODUCER) + of_kind(spans, SpanKind.CONSUMER)
    assert len(fired) == 2
    for span in fired:
        assert dict(span.attributes or {})["skunkqueue.periodic.slot"] == slot


def test_a_forged_trace_context_in_a_signed_record_is_refused(spans: InMemorySpanExporter, queue: SkunkQueue,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(signing.SECRET_ENV, "the right key")
    traced = declare(queue, otel_jobs.traced)
    genuine = traced.fire(1)
    template = queue.get(genuine.id)
    assert template is not None and template.payload.startswith(b"skunq-hmac1:")
    victim = "4bf92f3577b34da6a3ce929d0e0e4736"  # someone else's trace
    evil = {"traceparent": f"00-{victim}-00f067aa0ba902b7-01"}
    arguments = headers.arguments(template.payload)
    signature = template.payload[:signing.overhead()]
    # The genuine signature kept, the headers swapped; and a record signed with another key.
    swapped = dataclasses.replace(template, id=new_id(), payload=signature + headers.wrap(evil, arguments))
    swapped_same_id = dataclasses.replace(template, payload=signature + headers.wrap(evil, arguments))
    other_key = dataclasses.replace(template, id=new_id(), payload=headers.wrap(evil, arguments))
    signing.sign(b"another key", other_key)
    queue.persistence.enqueue([swapped, other_key])
    run_all(queue)
    for forged in (swapped, other_key):
        stored = queue.get(forged.id)
        assert stored is not None and stored.state == ERROR
        assert stored.error is not None and stored.error["type"] == "JobRefused"
    assert genuine.state == COMPLETE
    finished = spans.get_finished_spans()
    assert victim not in {hex_trace(s) for s in finished}, "a forged context joined another trace"
    refused = [s for s in of_kind(spans, SpanKind.CONSUMER)
               if dict(s.attributes or {})["messaging.message.id"] in (swapped.id, other_key.id)]
    assert len(refused) == 2 and all(s.parent is None for s in refused)
    assert all(dict(s.attributes or {})["error.type"] == "JobRefused" for s in refused)
    # The genuine one, in the same run, does join its producer's trace (the check can fail).
    [producer] = of_kind(spans, SpanKind.PRODUCER)
    [consumer] = [s for s in of_kind(spans, SpanKind.CONSUMER)
                  if dict(s.attributes or {})["messaging.message.id"] == genuine.id]
    assert hex_trace(consumer) == hex_trace(producer)
    # Unsigned headers swapped on the very record a key holder signed are refused just the same.
    assert swapped_same_id.payload != template.payload
    monkeypatch.delenv(signing.SECRET_ENV)
    with pytest.raises(Exception, match="bad signature"):
        signing.verify(b"the right key", swapped_same_id)


def test_without_signing_a_record_carries_its_producers_context(spans: InMemorySpanExporter,
                                                                queue: SkunkQueue) -> None:
    # The counterpart of the test above: with nothing signed, the headers are taken as they are.
    traced = declare(queue, otel_jobs.traced)
    handle = traced.fire(1)
    run_all(queue)
    [producer] = of_kind(spans, SpanKind.PRODUCER)
    assert handle.result == hex_trace(producer)


def test_nothing_of_opentelemetry_is_imported_unless_enabled(tmp_path: Path) -> None:
    script = f"""
import json, sys
from skunkqueue import SkunkQueue, headers
from skunkqueue.testing import jobs
from skunkqueue.worker import Worker, WorkerConfig
# backend named: an address without a scheme may import other backends to find its own, and
# redis-py (8.x) imports opentelemetry itself whenever that is installed.
q = SkunkQueue("plain", backend="sqlite", conn_url={str(tmp_path / "plain.db")!r})
add = q.event(routes=["r"])(jobs.add.func)
handle = add.fire(2, 3)
worker = Worker(WorkerConfig(queue="plain", route="r", backend="sqlite", url={str(tmp_path / "plain.db")!r}))
worker.backend = worker.config.open()
for record in worker.backend.claim("r", worker.id, 30, limit=10):
    worker.execute(record)
print(json.dumps({{"result": handle.result, "headers": headers.of(q.get(handle.id)),
                   "otel": sorted(m for m in sys.modules if m.startswith("opentelemetry")),
                   "redis": "redis" in sys.modules}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"result": 5, "headers": {}, "otel": [], "redis": False}


def test_an_enqueue_that_fails_ends_its_producer_span_with_the_error(spans: InMemorySpanExporter,
                                                                    tmp_path: Path) -> None:
    from redis_servers import RedisServer

    from skunkqueue.errors import BackendUnavailable

    server = RedisServer(tmp_path / "redis").start()
    queue = SkunkQueue(f"otel-{uuid.uuid4().hex[:8]}", backend="redis", conn_url=server.url)
    try:
        traced = declare(queue, otel_jobs.traced)
        traced.fire(1)  # connected
        server.kill()  # the store goes away between two fires
        with pytest.raises(BackendUnavailable):
            traced.fire(2)
    finally:
        queue.close()
        server.stop()
    ok, failed = sorted(of_kind(spans, SpanKind.PRODUCER), key=lambda s: s.start_time or 0)
    assert ok.status.status_code == StatusCode.UNSET
    assert failed.status.status_code == StatusCode.ERROR
    assert dict(failed.attributes or {})["error.type"] == "BackendUnavailable"
    assert [e.name for e in failed.events] == ["exception"]


def test_an_unsigned_record_accepted_during_a_roll_out_names_no_parent(spans: InMemorySpanExporter,
                                                                      queue: SkunkQueue,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # SKUNQ_ACCEPT_UNSIGNED: a worker with a key runs unsigned records too; their writer need not hold
    # the key, so their trace context is not taken.
    traced = declare(queue, otel_jobs.traced)
    unsigned = traced.fire(1)  # no key yet: unsigned, with the producer's context
    monkeypatch.setenv(signing.SECRET_ENV, "the right key")
    monkeypatch.setenv(signing.ACCEPT_UNSIGNED_ENV, "1")
    signed = traced.fire(2)
    run_all(queue)
    assert (unsigned.state, signed.state) == (COMPLETE, COMPLETE)
    producers = {dict(s.attributes or {})["messaging.message.id"]: s for s in of_kind(spans, SpanKind.PRODUCER)}
    consumers = {dict(s.attributes or {})["messaging.message.id"]: s for s in of_kind(spans, SpanKind.CONSUMER)}
    assert consumers[unsigned.id].parent is None
    assert hex_trace(consumers[unsigned.id]) != hex_trace(producers[unsigned.id])
    assert hex_trace(consumers[signed.id]) == hex_trace(producers[signed.id])
