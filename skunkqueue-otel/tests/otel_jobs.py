"""Jobs the tracing tests fire; ``skunq work --import otel_jobs`` runs them in the subprocess tests."""

from __future__ import annotations

import time

from opentelemetry import trace

from skunkqueue.testing.kit import kit_queue, kit_routes

queue = kit_queue("otel-jobs")
routes = kit_routes(["r"])


@queue.event(routes=routes)
def traced(value: int) -> str:
    """Make a span of its own (it nests under the consumer span); return the trace id it ran in."""
    with trace.get_tracer("otel_jobs").start_as_current_span("inside the job"):
        return format(trace.get_current_span().get_span_context().trace_id, "032x")


@queue.event(routes=routes, retries=2, retry_backoff=0)
def always_fails(value: int) -> None:
    raise ValueError(f"failure {value}")


@queue.event(routes=routes)
def sleepy(seconds: float) -> str:
    time.sleep(seconds)
    return "rested"


def every_slot() -> str:
    """Declared periodic by the tests, on their own queues (a periodic job takes no arguments)."""
    return "ticked"


@queue.event(routes=routes)
async def traced_async(seconds: float) -> list[str]:
    """Await with a span of its own open: concurrent tasks must each nest under their own consumer span."""
    import asyncio

    with trace.get_tracer("otel_jobs").start_as_current_span("inside the async job") as span:
        await asyncio.sleep(seconds)
        context = span.get_span_context()
        parent = getattr(span, "parent", None)  # the SDK span knows its parent
        return [format(context.trace_id, "032x"), format(parent.span_id if parent else 0, "016x")]
