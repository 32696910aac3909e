"""OpenTelemetry tracing for SkunkQueue.

``SkunkQueueInstrumentor().instrument()`` in code, or nothing at all under
``opentelemetry-instrument`` (this distribution registers the instrumentor
under the ``opentelemetry_instrumentor`` entry point group). See README.md.
"""

from skunkqueue_otel.instrumentor import CONSUMER_CONTEXT_ENV, SkunkQueueInstrumentor, __version__

__all__ = ["CONSUMER_CONTEXT_ENV", "SkunkQueueInstrumentor", "__version__"]
