"""`opentelemetry-instrument` around a real `skunq work` and a producer script, console exporter, no code change."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import otel_jobs
import pytest

from skunkqueue import SkunkQueue
from skunkqueue.record import COMPLETE, ERROR, KILLED, RUNNING
from skunkqueue_otel import tree

BIN = Path(sys.executable).parent
INSTRUMENT = BIN / "opentelemetry-instrument"
JOBS_DIR = Path(otel_jobs.__file__).parent
VICTIM = "4bf92f3577b34da6a3ce929d0e0e4736"  # the trace a forged record tries to join

PRODUCER = f"""
import dataclasses, json, sys
sys.path.insert(0, {str(JOBS_DIR)!r})
import otel_jobs
from skunkqueue import headers, signing
from skunkqueue.record import new_id

traced = otel_jobs.traced.fire(1)
fails = otel_jobs.always_fails.fire(2)
sleepy = otel_jobs.sleepy.fire(60)
# A store writer without the key: the genuine signature, another trace context in the headers.
template = otel_jobs.queue.get(traced.id)
evil = {{"traceparent": "00-{VICTIM}-00f067aa0ba902b7-01"}}
forged = dataclasses.replace(template, id=new_id(), payload=template.payload[:signing.overhead()]
                             + headers.wrap(evil, headers.arguments(template.payload)),
                             state="pending", attempts=0, token=0, owner=None, lease_until=None,
                             started=None, finished=None, result=None, error=None)
otel_jobs.queue.persistence.enqueue([forged])
print(json.dumps({{"traced": traced.id, "fails": fails.id, "sleepy": sleepy.id, "forged": forged.id}}),
      file=open(sys.argv[1], "w"))
"""


def console_spans(text: str) -> list[dict[str, Any]]:
    """The spans the console exporter printed: indented JSON objects, one after another."""
    decoder, at, spans = json.JSONDecoder(), 0, []
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at >= len(text):
            return spans
        span, at = decoder.raw_decode(text, at)
        spans.append(span)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0,
             show: Callable[[], object] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} {show()}")
        time.sleep(0.1)


@pytest.mark.skipif(not INSTRUMENT.exists(), reason="opentelemetry-instrument (opentelemetry-distro) is not installed")
def test_opentelemetry_instrument_traces_a_real_pool_and_producer(tmp_path: Path) -> None:
    name = f"otel-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "SKUNQ_KIT_QUEUE": name, "SKUNQ_SQLITE_PATH": str(tmp_path / "q.db"),
           "SKUNQ_SECRET": "the right key", "OTEL_TRACES_EXPORTER": "console",
           "OTEL_METRICS_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none"}
    work_out, work_err = tmp_path / "work.out", tmp_path / "work.err"
    with open(work_out, "wb") as out, open(work_err, "wb") as err:
        pool = subprocess.Popen(
            [str(INSTRUMENT), str(BIN / "skunq"), "work", "-q", name, "-r", "r", "--import", "otel_jobs",
             "--path", str(JOBS_DIR), "--log-format", "json", "--log-level", "DEBUG", "--grace", "10"],
            stdout=out, stderr=err, env={**env, "OTEL_SERVICE_NAME": "worker"}, cwd=tmp_path)
    queue = SkunkQueue(name, conn_url=str(tmp_path / "q.db"))
    try:
        wait_for("the worker", lambda: pool.poll() is None and len(queue.workers()) == 1)
        script = tmp_path / "producer.py"
        script.write_text(PRODUCER)
        ids_file = tmp_path / "ids.json"
        producer = subprocess.run([str(INSTRUMENT), sys.executable, str(script), str(ids_file)],
                                  env={**env, "OTEL_SERVICE_NAME": "producer"}, cwd=tmp_path,
                                  capture_output=True, timeout=120)
        assert producer.returncode == 0, producer.stderr.decode()
        ids = json.loads(ids_file.read_text())

        def state(job: str) -> str | None:
            record = queue.get(ids[job])
            return record.state if record else None

        wait_for("the sleepy job to start", lambda: state("sleepy") == RUNNING)
        assert queue.kill(ids["sleepy"]) in (RUNNING, KILLED)
        states = lambda: tuple(state(job) for job in ("traced", "fails", "sleepy", "forged"))  # noqa: E731
        wait_for("every job to finish", lambda: states() == (COMPLETE, ERROR, KILLED, ERROR), show=states)
    finally:
        queue.close()
        pool.send_signal(signal.SIGTERM)
        pool.wait(timeout=60)  # the SDK exports what it still holds as each process exits

    produced = console_spans(producer.stdout.decode())
    consumed = console_spans(work_out.read_text())
    sent = {s["attributes"]["messaging.message.id"]: s for s in produced if s["kind"] == "SpanKind.PRODUCER"}
    assert set(sent) == {ids["traced"], ids["fails"], ids["sleepy"]}
    attempts: dict[str, list[dict[str, Any]]] = {}
    for span in consumed:
        if span["kind"] == "SpanKind.CONSUMER":
            attempts.setdefault(span["attributes"]["messaging.message.id"], []).append(span)
    # Each attempt's span is in its producer's trace, a child of the producer span.
    for job in ("traced", "fails", "sleepy"):
        for span in attempts[ids[job]]:
            assert span["context"]["trace_id"] == sent[ids[job]]["context"]["trace_id"], job
            assert span["parent_id"] == sent[ids[job]]["context"]["span_id"], job
    assert [s["attributes"]["skunkqueue.job.attempt"] for s in attempts[ids["fails"]]] == [1, 2, 3]
    [killed] = attempts[ids["sleepy"]]
    assert killed["status"] == {"status_code": "ERROR", "description": "killed by request"}
    assert "skunkqueue.job.killed" in [e["name"] for e in killed["events"]]
    # The forged record was refused, and its span stayed out of the victim's trace.
    [forged] = attempts[ids["forged"]]
    assert forged["parent_id"] is None and forged["attributes"]["error.type"] == "JobRefused"
    assert VICTIM not in json.dumps(produced + consumed)
    # The job's own span nests under the consumer span, in the worker process.
    [inner] = [s for s in consumed if s["name"] == "inside the job"]
    assert inner["parent_id"] == attempts[ids["traced"]][0]["context"]["span_id"]

    # The tree docs/guides/tracing.md shows, drawn from the same output: request-less here, so the send span is a root.
    drawn = tree.render(produced + consumed)
    assert f"send {name}/r  [PRODUCER; producer" in drawn
    assert f"└── process {name}/r  [CONSUMER; worker" in drawn and "ERROR: killed by request" in drawn

    # --log-format json: one object per line; a job's line names the trace it belongs to.
    lines = [json.loads(line) for line in work_err.read_text().splitlines() if line.strip()]
    jobs = {}
    for line in lines:
        if "job_id" in line:
            assert {"function", "route", "attempt", "outcome", "duration"} <= set(line)
            jobs.setdefault(line["job_id"], []).append(line)
    assert [(j["attempt"], j["outcome"]) for j in jobs[ids["fails"]]] == [(1, "pending"), (2, "pending"), (3, "error")]
    for job in ("traced", "fails", "sleepy"):
        assert {j["trace_id"] for j in jobs[ids[job]]} == {sent[ids[job]]["context"]["trace_id"][2:]}
    # A refused job's own line (at DEBUG: one warning per function) names no trace; no line names the victim.
    assert [(j["level"], j["outcome"], j.get("trace_id")) for j in jobs[ids["forged"]]] == [("DEBUG", ERROR, None)]
    assert VICTIM not in work_err.read_text()
    assert any("refusing jobs of otel_jobs:traced" in line["message"] for line in lines)
    assert jobs[ids["sleepy"]][0]["outcome"] == KILLED
    assert "Failed to detach context" not in work_err.read_text()



@pytest.mark.skipif(not INSTRUMENT.exists(), reason="opentelemetry-instrument (opentelemetry-distro) is not installed")
def test_an_attempt_whose_lease_was_lost_ends_its_span_saying_so(tmp_path: Path) -> None:
    name = f"otel-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "SKUNQ_KIT_QUEUE": name, "OTEL_TRACES_EXPORTER": "console",
           "OTEL_METRICS_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none", "OTEL_SERVICE_NAME": "worker"}
    env.pop("SKUNQ_SECRET", None)
    work_out = tmp_path / "work.out"
    lease = 1.5
    with open(work_out, "wb") as out:
        pool = subprocess.Popen(
            [str(INSTRUMENT), str(BIN / "skunq"), "work", "-q", name, "-r", "r", "--url", str(tmp_path / "q.db"),
             "--import", "otel_jobs", "--path", str(JOBS_DIR), "--lease", str(lease)],
            stdout=out, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    queue = SkunkQueue(name, conn_url=str(tmp_path / "q.db"))
    stopped = False
    try:
        sleepy = queue.event(routes=["r"])(otel_jobs.sleepy.func)
        wait_for("the worker", lambda: pool.poll() is None and len(queue.workers()) == 1)
        handle = sleepy.fire(4)
        wait_for("the job to start", lambda: handle.state == RUNNING)
        # The pool stops renewing the lease: the worker interrupts the job and drops its outcome.
        os.kill(pool.pid, signal.SIGSTOP)
        stopped = True
        time.sleep(lease * 2 / 3 + 2.0)
        os.kill(pool.pid, signal.SIGCONT)
        stopped = False
        wait_for("the job to complete on a later attempt", lambda: handle.state == COMPLETE, timeout=90,
                 show=lambda: queue.get(handle.id))
    finally:
        if stopped:
            os.kill(pool.pid, signal.SIGCONT)
        queue.close()
        pool.send_signal(signal.SIGTERM)
        pool.wait(timeout=60)
    attempts = sorted((s for s in console_spans(work_out.read_text()) if s["kind"] == "SpanKind.CONSUMER"
                       and s["attributes"]["messaging.message.id"] == handle.id),
                      key=lambda s: s["attributes"]["skunkqueue.job.attempt"])
    assert len(attempts) >= 2
    lost, last = attempts[0], attempts[-1]
    assert lost["attributes"]["skunkqueue.job.outcome"] == "lost"
    assert lost["status"]["status_code"] == "ERROR" and lost["status"]["description"].startswith("lease lost")
    assert "skunkqueue.job.lease_lost" in [e["name"] for e in lost["events"]]
    assert last["attributes"]["skunkqueue.job.outcome"] == COMPLETE


@pytest.mark.skipif(not INSTRUMENT.exists(), reason="opentelemetry-instrument (opentelemetry-distro) is not installed")
def test_concurrent_async_jobs_each_run_inside_their_own_consumer_span(tmp_path: Path) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from skunkqueue_otel import SkunkQueueInstrumentor

    name = f"otel-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "SKUNQ_KIT_QUEUE": name, "OTEL_TRACES_EXPORTER": "console",
           "OTEL_METRICS_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none", "OTEL_SERVICE_NAME": "worker"}
    env.pop("SKUNQ_SECRET", None)
    work_out, work_err = tmp_path / "work.out", tmp_path / "work.err"
    with open(work_out, "wb") as out, open(work_err, "wb") as err:
        pool = subprocess.Popen(
            [str(INSTRUMENT), str(BIN / "skunq"), "work", "-q", name, "-r", "r", "--url", str(tmp_path / "q.db"),
             "--import", "otel_jobs", "--path", str(JOBS_DIR), "--async-concurrency", "4", "--prefetch", "4"],
            stdout=out, stderr=err, env=env, cwd=tmp_path)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = SkunkQueueInstrumentor()
    instrumentor.instrument(tracer_provider=provider)  # the producer: this test process
    queue = SkunkQueue(name, conn_url=str(tmp_path / "q.db"))
    try:
        job = queue.event(routes=["r"])(otel_jobs.traced_async.func)
        wait_for("the worker", lambda: pool.poll() is None and len(queue.workers()) == 1)
        handles = job.fire_many([(1.5,)] * 4)
        wait_for("the jobs", lambda: all(h.state == COMPLETE for h in handles),
                 show=lambda: [h.state for h in handles])
        results = {h.id: h.result for h in handles}
    finally:
        instrumentor.uninstrument()
        queue.close()
        pool.send_signal(signal.SIGTERM)
        pool.wait(timeout=60)
    sent = {s.attributes["messaging.message.id"]: s for s in exporter.get_finished_spans()  # type: ignore[index]
            if s.kind.name == "PRODUCER"}
    consumers = {s["attributes"]["messaging.message.id"]: s for s in console_spans(work_out.read_text())
                 if s["kind"] == "SpanKind.CONSUMER"}
    starts = sorted(s["start_time"] for s in consumers.values())
    ends = sorted(s["end_time"] for s in consumers.values())
    assert starts[-1] < ends[0], "the async jobs did not overlap: the test proves nothing"
    for job_id, (trace_id, parent) in results.items():
        producer = sent[job_id].context
        assert producer is not None and trace_id == format(producer.trace_id, "032x")
        assert parent == consumers[job_id]["context"]["span_id"][2:]
    # Each task attached and detached its own context: OpenTelemetry logs a mismatch.
    assert "Failed to detach context" not in work_err.read_text()
