"""Turning tracing on and off: the OpenTelemetry instrumentor.

It registers :class:`~skunkqueue_otel.spans.TracingPlugin` with SkunkQueue's
plugin manager; SkunkQueue itself never imports OpenTelemetry.
"""

from __future__ import annotations

import os
from typing import Any, Collection

from opentelemetry import trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from skunkqueue import hooks
from skunkqueue_otel.spans import CONSUMER_CONTEXTS, SCHEMA_URL, TracingPlugin

# How a worker's span relates to the producer's: "parent" (one trace from the
# click to the job) or "link" (a trace of its own per attempt, linked to the producer).
CONSUMER_CONTEXT_ENV = "OTEL_PYTHON_SKUNKQUEUE_CONSUMER_CONTEXT"
_PLUGIN_NAME = "skunkqueue_otel"
__version__ = "0.2.0"  # the package's (it re-exports it); kept here so that this module needs nothing of its package


class SkunkQueueInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """``instrument(tracer_provider=..., consumer_context="parent"|"link")``; both optional."""

    _plugin: TracingPlugin | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return ("skunkqueue >= 0.2, < 0.3",)

    def _instrument(self, **kwargs: Any) -> None:
        mode = kwargs.get("consumer_context") or os.environ.get(CONSUMER_CONTEXT_ENV) or "parent"
        if mode not in CONSUMER_CONTEXTS:
            raise ValueError(f"consumer_context ({CONSUMER_CONTEXT_ENV}) must be 'parent' or 'link', not {mode!r}.")
        tracer = trace.get_tracer(__name__.rsplit(".", 1)[0], __version__, kwargs.get("tracer_provider"),
                                  schema_url=SCHEMA_URL)
        self._plugin = TracingPlugin(tracer, link=mode == "link")
        hooks.plugin_manager().register(self._plugin, name=_PLUGIN_NAME)

    def _uninstrument(self, **kwargs: Any) -> None:
        if self._plugin is not None:
            hooks.plugin_manager().unregister(self._plugin)
            self._plugin.close()
            self._plugin = None
