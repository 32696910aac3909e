"""Draw the traces in console-exporter output as span trees: ``python -m skunkqueue_otel.tree FILE ...``.

``OTEL_TRACES_EXPORTER=console`` prints each span as an indented JSON object;
give this the outputs of the producer and of ``skunq work`` and it prints one
tree per trace, children under their parent in start order, for a look at a
trace where no tracing backend (Jaeger, Tempo) runs.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any, Iterable


def read_spans(text: str) -> list[dict[str, Any]]:
    """The span objects in console-exporter output (other text between them is skipped)."""
    decoder, at, spans = json.JSONDecoder(), 0, []
    while (at := text.find("{", at)) >= 0:
        try:
            value, end = decoder.raw_decode(text, at)
        except ValueError:
            at += 1
            continue
        if isinstance(value, dict) and "context" in value and "name" in value:
            spans.append(value)
        at = end
    return spans


def _time(span: dict[str, Any], key: str) -> float:
    return datetime.fromisoformat(span[key].replace("Z", "+00:00")).timestamp()


def _line(span: dict[str, Any]) -> str:
    kind = span.get("kind", "").replace("SpanKind.", "")
    service = span.get("resource", {}).get("attributes", {}).get("service.name", "")
    took = (_time(span, "end_time") - _time(span, "start_time")) * 1000
    attributes = span.get("attributes", {})
    details = [f"{kind}", service, f"{took:.1f} ms"]
    if "skunkqueue.job.attempt" in attributes:
        details.append(f"attempt {attributes['skunkqueue.job.attempt']}")
    status = span.get("status", {})
    if status.get("status_code") == "ERROR":
        details.append(f"ERROR: {status.get('description', '')}")
    events = [e["name"] for e in span.get("events", []) if e["name"] != "exception"]
    if events:
        details.append("events: " + ", ".join(events))
    return f"{span['name']}  [{'; '.join(d for d in details if d)}]"


def render(spans: Iterable[dict[str, Any]]) -> str:
    spans = sorted(spans, key=lambda s: _time(s, "start_time"))
    ids = {s["context"]["span_id"] for s in spans}
    children: dict[str, list[dict[str, Any]]] = {}
    roots = []
    for span in spans:
        parent = span.get("parent_id")
        if isinstance(parent, str) and parent in ids:
            children.setdefault(parent, []).append(span)
        else:
            roots.append(span)
    lines: list[str] = []

    def draw(span: dict[str, Any], prefix: str, last: bool, top: bool) -> None:
        lines.append(_line(span) if top else f"{prefix}{'└── ' if last else '├── '}{_line(span)}")
        below = children.get(span["context"]["span_id"], [])
        for number, child in enumerate(below):
            draw(child, "" if top else prefix + ("    " if last else "│   "), number == len(below) - 1, False)

    for root in roots:
        lines.append(f"trace {root['context']['trace_id'][2:]}")
        draw(root, "", True, True)
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m skunkqueue_otel.tree CONSOLE_OUTPUT [CONSOLE_OUTPUT ...]", file=sys.stderr)
        return 2
    spans: list[dict[str, Any]] = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            spans += read_spans(fh.read())
    print(render(spans))
    return 0


if __name__ == "__main__":
    sys.exit(main())
