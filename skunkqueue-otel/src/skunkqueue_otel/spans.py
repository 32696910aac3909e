"""The spans, after the OpenTelemetry semantic conventions for messaging.

A PRODUCER span ``send <queue>/<route>`` per record a ``fire``/``fire_many``/
``afire`` enqueues; its context travels in the record's headers (inside the
signature when records are signed). A CONSUMER span ``process <queue>/<route>``
per attempt, child of (or linked to) that context, current while the job runs,
so the job's own spans (HTTP calls, queries) nest under it.

Workflows: a step's spans link to its parents' producer spans. The producer knows
them (parents are sent before their dependents, in the same call, or in an earlier
one of this process: a bounded memory of recent sends), and writes their contexts
into the step's headers, so the worker's link is as trustworthy as the record.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Optional

from opentelemetry import context, propagate, trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from skunkqueue import headers
from skunkqueue.context import user_key
from skunkqueue.hooks import hookimpl
from skunkqueue.periodic import slot_of
from skunkqueue.record import COMPLETE, KILLED, PENDING, JobRecord, Outcome

CONSUMER_CONTEXTS = ("parent", "link")
SCHEMA_URL = "https://opentelemetry.io/schemas/1.27.0"
SYSTEM = "skunkqueue"

# Events on the consumer span.
KILLED_EVENT = "skunkqueue.job.killed"
RETRY_EVENT = "skunkqueue.job.retry_scheduled"
DEAD_EVENT = "skunkqueue.job.dead_lettered"
LOST_EVENT = "skunkqueue.job.lease_lost"

# The header that carries a workflow step's parents' producer contexts (W3C traceparents).
PARENTS_HEADER = "skunkqueue-parents"
# How many recent producer contexts a process keeps, for ``fire(after=handle)`` of a parent
# sent by an earlier call; an older parent is simply not linked.
REMEMBERED_SENDS = 10_000


def traceparent(span_context: trace.SpanContext) -> str:
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{int(span_context.trace_flags):02x}"


def parent_links(carrier: dict[str, str]) -> list[Link]:
    """Links to the producer spans named in a step's (verified) headers; malformed entries are skipped."""
    links = []
    for value in carrier.get(PARENTS_HEADER, "").split(","):
        parent = trace.get_current_span(propagate.extract({"traceparent": value})).get_span_context()
        if parent.is_valid:
            links.append(Link(parent, {"skunkqueue.link": "workflow.parent"}))
    return links


def destination(record: JobRecord) -> str:
    """The low-cardinality destination name: ``<queue>/<route>``."""
    return f"{record.queue}/{record.route}"


def _attributes(record: JobRecord, operation: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
        "messaging.destination.name": destination(record),
        "messaging.message.id": record.id,
        "skunkqueue.job.function": record.func,
    }
    key = user_key(record.key)
    if key is not None:
        attributes["skunkqueue.job.key"] = key
        slot = slot_of(key, record.func)
        if slot is not None:
            attributes["skunkqueue.periodic.slot"] = slot
    if record.target is not None:
        attributes["skunkqueue.job.target"] = record.target
    return attributes


class TracingPlugin:
    """SkunkQueue hook implementations that make the spans (registered by the instrumentor)."""

    def __init__(self, tracer: trace.Tracer, *, link: bool = False) -> None:
        self._tracer = tracer
        self._link = link
        self._lock = threading.Lock()  # producers fire from many threads at once
        self._sending: dict[int, list[tuple[Span, str]]] = {}
        self._running: dict[tuple[str, int], tuple[Span, Optional[object]]] = {}
        self._sent: OrderedDict[str, trace.SpanContext] = OrderedDict()  # job id -> its producer span

    # -- producer ---------------------------------------------------------------

    @hookimpl
    def job_sending(self, records: list[JobRecord], headers: list[dict[str, str]]) -> None:
        spans = []
        for record, carrier in zip(records, headers):
            parents = self._parents(record)
            links = [Link(parent, {"skunkqueue.link": "workflow.parent"}) for parent in parents]
            span = self._tracer.start_span(f"send {destination(record)}", kind=SpanKind.PRODUCER,
                                           attributes=_attributes(record, "send"), links=links or None)
            propagate.inject(carrier, context=trace.set_span_in_context(span))
            if parents:
                carrier[PARENTS_HEADER] = ",".join(traceparent(parent) for parent in parents)
            spans.append((span, record.id))
            self._remember(record.id, span.get_span_context())
        with self._lock:
            self._sending[id(records)] = spans

    def _parents(self, record: JobRecord) -> list[trace.SpanContext]:
        """The producer contexts of ``record``'s workflow parents that this process sent."""
        with self._lock:
            found = (self._sent.get(parent) for parent in record.parents or ())
            return [parent for parent in found if parent is not None and parent.is_valid]

    def _remember(self, job_id: str, span_context: trace.SpanContext) -> None:
        with self._lock:
            self._sent[job_id] = span_context
            while len(self._sent) > REMEMBERED_SENDS:
                self._sent.popitem(last=False)

    @hookimpl
    def job_sent(self, records: list[JobRecord], error: BaseException | None) -> None:
        with self._lock:
            spans = self._sending.pop(id(records), [])
        for (span, sent_id), record in zip(spans, records):
            if record.id != sent_id:  # an idempotency key already held: the existing job stands
                span.set_attribute("messaging.message.id", record.id)
                span.set_attribute("skunkqueue.job.duplicate", True)
            if error is not None:
                span.record_exception(error)
                span.set_attribute("error.type", type(error).__qualname__)
                span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            span.end()

    # -- consumer ---------------------------------------------------------------

    @hookimpl
    def job_started(self, record: JobRecord) -> None:
        # The worker calls this only after the record's signature (if any) held; an unsigned
        # record that a worker with a key accepts (a roll-out) names no parent.
        carrier = headers.trusted(record)
        parent = propagate.extract(carrier)
        producer = trace.get_current_span(parent).get_span_context()
        steps = parent_links(carrier)
        if self._link:
            links = ([Link(producer)] if producer.is_valid else []) + steps
            span = self._start(record, context.Context(), links or None)
        else:
            span = self._start(record, parent, steps or None)
        token = context.attach(trace.set_span_in_context(span))
        with self._lock:
            self._running[(record.id, record.token)] = (span, token)

    def _start(self, record: JobRecord, parent: context.Context, links: list[Link] | None) -> Span:
        attributes = _attributes(record, "process")
        attributes["skunkqueue.job.attempt"] = record.attempts
        attributes["skunkqueue.job.token"] = record.token
        if record.owner:
            attributes["messaging.client.id"] = record.owner
        return self._tracer.start_span(f"process {destination(record)}", context=parent, kind=SpanKind.CONSUMER,
                                       attributes=attributes, links=links)

    def _take(self, record: JobRecord) -> tuple[Span, object | None]:
        with self._lock:
            running = self._running.pop((record.id, record.token), None)
        if running is not None:
            return running
        # The job never started (refused, unreadable): its headers were not verified, so
        # the span is a root of its own; a forged context must not join someone's trace.
        return self._start(record, context.Context(), None), None

    @hookimpl
    def job_finished(self, record: JobRecord, outcome: Outcome) -> None:
        span, token = self._take(record)
        try:
            span.set_attribute("skunkqueue.job.outcome", outcome.state)
            error = outcome.error if outcome.state != COMPLETE else None
            if error:
                kind, message = error.get("type", ""), error.get("message", "")
                span.set_attribute("error.type", kind or "_OTHER")
                span.add_event("exception", {"exception.type": kind, "exception.message": message,
                                             "exception.stacktrace": error.get("traceback", "")})
                if outcome.state == KILLED:
                    span.add_event(KILLED_EVENT, {"skunkqueue.kill.reason": message})
                    span.set_status(Status(StatusCode.ERROR, message))  # the span ends with its reason
                else:
                    span.set_status(Status(StatusCode.ERROR, f"{kind}: {message}"))
            if outcome.state == PENDING and outcome.due is not None:
                span.add_event(RETRY_EVENT, {"skunkqueue.retry.due": outcome.due,
                                             "skunkqueue.retry.delay": max(0.0, outcome.due - time.time())})
            if outcome.dead:
                span.add_event(DEAD_EVENT, {"skunkqueue.job.attempts": record.attempts})
        finally:
            span.end()
            if token is not None:
                context.detach(token)  # type: ignore[arg-type]

    @hookimpl
    def job_lost(self, record: JobRecord) -> None:
        span, token = self._take(record)
        span.set_attribute("skunkqueue.job.outcome", "lost")
        span.set_attribute("error.type", "LeaseLost")
        span.add_event(LOST_EVENT)
        span.set_status(Status(StatusCode.ERROR, "lease lost: another worker may own the job"))
        span.end()
        if token is not None:
            context.detach(token)  # type: ignore[arg-type]

    def close(self) -> None:
        """End the spans still open (the instrumentation is being turned off)."""
        with self._lock:
            sending = [span for spans in self._sending.values() for span, _ in spans]
            running = [span for span, _ in self._running.values()]
            self._sending.clear()
            self._running.clear()
        for span in sending + running:
            span.end()
