"""/metrics in Prometheus's format, from the store and from the workers' counters."""

from __future__ import annotations

import time
from typing import Any, Callable

from conftest import Store, Web
from prometheus_client.parser import text_string_to_metric_families


def samples(web: Web) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = web.get("/metrics")
    assert status == 200
    found = {}
    for family in text_string_to_metric_families(text):  # also proves the format parses
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def test_metrics_follow_the_store_and_the_workers_counters(store: Store, start_web: Callable[..., Web],
                                                           start_pool: Callable[[Store], Any]) -> None:
    web = start_web(store)
    q = store.queue
    before = samples(web)
    assert value(before, "skunkqueue_jobs", queue=q, route="fast", state="pending") is None  # no jobs yet
    pending = [store.job("add").fire(i, i) for i in range(3)]
    # The counts are at most one refresh interval (0.5 s here) old.
    deadline = time.monotonic() + 10
    while value(found := samples(web), "skunkqueue_jobs", queue=q, route="fast", state="pending") != 3:
        assert time.monotonic() < deadline, found
        time.sleep(0.1)
    assert value(found, "skunkqueue_oldest_pending_age_seconds", queue=q, route="fast") >= 0
    start_pool(store)
    store.job("boom").fire("x")
    for handle in pending:
        handle.wait(timeout=60)
    keeps = store.queue_handle().persistence.keeps_stats
    deadline = time.monotonic() + 30
    while True:
        found = samples(web)
        done = (value(found, "skunkqueue_jobs", queue=q, route="fast", state="complete") == 3
                and value(found, "skunkqueue_dead_letters", queue=q, route="fast") == 1
                and (not keeps or value(found, "skunkqueue_attempts_total", queue=q, route="fast",
                                        outcome="completed") == 3))
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert value(found, "skunkqueue_jobs", queue=q, route="fast", state="complete") == 3
    assert value(found, "skunkqueue_jobs", queue=q, route="fast", state="error") == 1
    assert value(found, "skunkqueue_dead_letters", queue=q, route="fast") == 1
    assert value(found, "skunkqueue_workers", queue=q, route="fast", alive="true") == 1
    assert value(found, "skunkqueue_stats_kept", queue=q) == (1 if keeps else 0)
    if keeps:
        assert value(found, "skunkqueue_attempts_total", queue=q, route="fast", outcome="completed") == 3
        assert value(found, "skunkqueue_attempts_total", queue=q, route="fast", outcome="failed") == 1
        assert value(found, "skunkqueue_job_duration_seconds_count", queue=q, route="fast") == 4
        assert value(found, "skunkqueue_job_duration_seconds_bucket", queue=q, route="fast", le="+Inf") == 4
        # add() sleeps 20 ms, so its three attempts are above the 10 ms bound (boom() may be either side).
        assert value(found, "skunkqueue_job_duration_seconds_bucket", queue=q, route="fast", le="0.01") <= 1
        assert value(found, "skunkqueue_job_duration_seconds_sum", queue=q, route="fast") >= 0.06
    else:
        # No counters: no made-up zeros either.
        assert not any(name.startswith("skunkqueue_attempts") for name, _ in found)
    assert store.runs_of("add") == 3 and store.runs_of("boom") == 1
