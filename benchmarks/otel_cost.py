"""What OpenTelemetry tracing (skunkqueue-otel) costs per job, producer and worker side.

    python -m benchmarks.otel_cost [-n JOBS] [-r ROUNDS]      (make bench-otel)

On an embedded (SQLite) queue in a temporary directory, each round fires JOBS jobs one ``fire()``
at a time and then runs them with an in-process worker (claim, ``Worker.execute``: the code a
``skunq work`` worker runs per job, without the pool's process hops), once per mode:

- ``off``: the instrumentation not enabled (no plugin registered: what an install without
  skunkqueue-otel runs, plus one look at the plugin manager per fire);
- ``on``: enabled, the SDK recording every span and handing it to a BatchSpanProcessor whose
  exporter discards it (what an OTLP exporter costs the process, short of the network);
- ``on, unsampled``: enabled, the SDK's sampler saying no (spans are not recorded; the trace
  context still travels).

``make bench`` shows the first two as rows on SQLite (``ROWS``, ``run``: 1,000 jobs x 3 rounds);
this module alone runs all three modes longer.

Modes alternate within each round (and their order flips every round), so load from elsewhere on
the machine hits them alike. Reported: per mode, the median over rounds of microseconds per job,
and the difference to ``off``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from skunkqueue import SkunkQueue
from skunkqueue.testing import jobs
from skunkqueue.worker import Worker, WorkerConfig
from skunkqueue_otel import SkunkQueueInstrumentor

MODES = ("off", "on", "on, unsampled")

# Rows of ``make bench`` (key, label, format, higher is better): what enabling tracing adds.
ROWS = [
    ("otel_fire_us", "tracing on: fire() cost added (us/job)", "{:+.0f}", False),
    ("otel_worker_us", "tracing on: worker cost added (us/job)", "{:+.0f}", False),
]


class Discard(SpanExporter):
    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def providers() -> dict[str, tuple[TracerProvider, Discard]]:
    made = {}
    for mode in MODES[1:]:
        exporter = Discard()
        provider = TracerProvider(sampler=ALWAYS_OFF) if "unsampled" in mode else TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        made[mode] = (provider, exporter)
    return made


def one_round(directory: Path, jobs_n: int, mode: str, made: dict[str, tuple[TracerProvider, Discard]],
              ) -> tuple[float, float]:
    """(fire, process) microseconds per job in ``mode``."""
    instrumentor = SkunkQueueInstrumentor()
    if mode != "off":
        instrumentor.instrument(tracer_provider=made[mode][0])
    name = f"otel-bench-{uuid.uuid4().hex[:8]}"
    db = str(directory / f"{name}.db")
    queue = SkunkQueue(name, conn_url=db)
    add = queue.event(routes=["r"])(jobs.add.func)
    try:
        add.fire(0, 0)  # the connection and the table, outside the timing
        started = time.perf_counter()
        for i in range(jobs_n):
            add.fire(i, 1)
        fire_us = (time.perf_counter() - started) / jobs_n * 1e6
        worker = Worker(WorkerConfig(queue=name, route="r", url=db))
        worker.backend = worker.config.open()
        ran = 0
        started = time.perf_counter()
        while claimed := worker.held or worker.backend.claim("r", worker.id, 30, limit=10):
            worker.held = []
            for record in claimed:
                worker.execute(record)
                ran += 1
        process_us = (time.perf_counter() - started) / (ran - 1) * 1e6
        worker.backend.close()
        if ran != jobs_n + 1:
            raise SystemExit(f"{mode}: ran {ran} jobs, fired {jobs_n + 1}")
    finally:
        queue.close()
        if mode != "off":
            instrumentor.uninstrument()
    return fire_us, process_us


def measure(jobs_n: int, rounds: int, modes: Sequence[str] = MODES,
            log: Any = None) -> tuple[dict[str, list[tuple[float, float]]], dict[str, tuple[TracerProvider, Discard]]]:
    """Per mode, one (fire, process) microseconds-per-job pair per round; modes alternate."""
    made = providers()
    timings: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for number in range(rounds):
            order = tuple(modes) if number % 2 == 0 else tuple(reversed(modes))
            for mode in order:
                timings[mode].append(one_round(Path(tmp), jobs_n, mode, made))
            if log is not None:
                log(f"round {number + 1}/{rounds} done")
    for provider, _ in made.values():
        provider.shutdown()
    return timings, made


def run(args: argparse.Namespace, result: Any, log: Any, jobs_n: int = 1000, rounds: int = 3) -> None:
    """The ``make bench`` rows, into ``result`` (the SQLite column)."""
    if getattr(args, "no_otel", False):
        return
    import logging

    log(f"  tracing cost: {jobs_n} jobs x {rounds} rounds, off and on")
    logging.disable(logging.INFO)
    try:
        timings, made = measure(jobs_n, rounds, MODES[:2])
    finally:
        logging.disable(logging.NOTSET)
    expected = 2 * (jobs_n + 1) * rounds
    result.check("otel_spans", made["on"][1].spans == expected,
                 f"tracing on exported {made['on'][1].spans} spans, expected {expected}")
    fire = {mode: statistics.median(t[0] for t in timings[mode]) for mode in MODES[:2]}
    work = {mode: statistics.median(t[1] for t in timings[mode]) for mode in MODES[:2]}
    result.figures.update(otel_fire_us=fire["on"] - fire["off"], otel_worker_us=work["on"] - work["off"])
    result.notes.append(f"tracing rows: SDK recording every span into a BatchSpanProcessor that discards them; "
                        f"in-process worker, medians of {rounds} alternated rounds of {jobs_n} jobs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--jobs", type=int, default=2000)
    parser.add_argument("-r", "--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    import logging

    logging.disable(logging.INFO)  # the worker's line per job is not what is measured here
    timings, made = measure(args.jobs, args.rounds, MODES,
                            log=lambda message: print(message, file=sys.stderr))
    recorded = made["on"][1].spans
    expected = 2 * (args.jobs + 1) * args.rounds
    print(f"\n{args.jobs} jobs x {args.rounds} rounds, SQLite, in-process worker; "
          f"spans exported in 'on': {recorded} (expected {expected})\n")
    base: dict[str, Any] = {}
    print(f"{'mode':16} {'fire us/job':>12} {'+/- off':>9} {'worker us/job':>14} {'+/- off':>9}")
    for mode in MODES:
        fire = statistics.median(t[0] for t in timings[mode])
        process = statistics.median(t[1] for t in timings[mode])
        base.setdefault("fire", fire)
        base.setdefault("process", process)
        print(f"{mode:16} {fire:12.1f} {fire - base['fire']:+9.1f} {process:14.1f} {process - base['process']:+9.1f}")
    if recorded != expected:
        print("the 'on' mode did not export a span per job and attempt", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
