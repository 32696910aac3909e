"""What the monitor adds beside the job listings: per-function figures, per-worker counts and
concurrency, searching by error type, and its icon; computed here independently from the store and
from the runs the jobs wrote outside the queue."""

from __future__ import annotations

import math
import re
import time
from html import unescape
from typing import Any, Callable

import pytest
from conftest import Store, Web
from skunkqueue_web.app import _age
from test_web_security import TOKEN, call
from test_web_views import rows

from skunkqueue.errors import JobFailed


def cells(page: str, table: str, key: str) -> dict[str, dict[str, str]]:
    """{row key: {data-col: text}} of a table whose rows carry ``data-<key>``."""
    body = re.search(rf'<table class="grid" id="{table}">(.*?)</table>', page, re.S)
    assert body, f"no #{table} table"
    found: dict[str, dict[str, str]] = {}
    for row_key, row in re.findall(rf'<tr data-{key}="([^"]*)">(.*?)</tr>', body.group(1), re.S):
        found[unescape(row_key)] = {col: unescape(text.strip()) for col, text in
                                    re.findall(r'data-col="([^"]+)">(.*?)</td>', row, re.S)}
    return found


def nearest_rank(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def fire_and_settle(store: Store) -> dict[str, Any]:
    """Six jobs that complete, one that times out twice then completes, one dead after two
    ValueErrors, one dead after a FileNotFoundError; all waited for."""
    adds = store.job("add").fire_many([(i, i) for i in range(6)])
    flaky = store.job("flaky", retries=2, retry_backoff=0.05).fire("flaky", 2)
    boom = store.job("boom", retries=1, retry_backoff=0.05).fire("x")
    missing = store.job("needs_file").fire("/nonexistent/skunq-monitor-test")
    for handle in adds:
        handle.wait(timeout=60)
    assert flaky.wait(timeout=60) == 3
    for handle in (boom, missing):
        with pytest.raises(JobFailed):
            handle.wait(timeout=60)
    return {"adds": [h.id for h in adds], "flaky": flaky.id, "boom": boom.id, "missing": missing.id}


def test_functions_workers_error_search_and_icon(store: Store, start_web: Callable[..., Web],
                                                  start_pool: Callable[..., Any]) -> None:
    start_pool(store, "--async-concurrency", "3")
    ids = fire_and_settle(store)
    web = start_web(store, token=TOKEN)
    queue = store.queue_handle()

    # Search by error type: the last error's, or any attempt's (flaky completed after two timeouts).
    assert rows(call(web, "GET", "/jobs?error=timeout")[2]) == [ids["flaky"]]
    assert rows(call(web, "GET", "/jobs?error=ValueError")[2]) == [ids["boom"]]
    assert sorted(rows(call(web, "GET", "/jobs?error=ERROR")[2])) == sorted([ids["flaky"], ids["boom"], ids["missing"]])
    assert rows(call(web, "GET", "/dead?error=FileNotFound")[2]) == [ids["missing"]]
    assert rows(call(web, "GET", "/dead?error=timeout")[2]) == []
    assert rows(call(web, "GET", "/jobs?error=nosuch")[2]) == []
    # "All matching the filter" acts on what the error filter matches, nothing else.
    status, headers, _ = call(web, "POST", "/dead", {"action": "dismiss", "scope": "matching", "error": "filenot"},
                              headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 303 and "Removed+1+job" in headers["location"]
    assert rows(call(web, "GET", "/dead")[2]) == [ids["boom"]]

    # Per function: computed here from the records' histories.
    records = {job_id: queue.get(job_id) for job_id in [*ids["adds"], ids["flaky"], ids["boom"], ids["missing"]]}
    page = call(web, "GET", "/functions")[2]
    assert 'id="functions-source"' in page and "all 9 jobs the store holds" in page
    shown = cells(page, "functions", "func")
    by_func: dict[str, list[Any]] = {}
    for record in records.values():
        assert record is not None
        by_func.setdefault(record.func, []).append(record)
    assert set(shown) == set(by_func)
    for func, found in by_func.items():
        entries = [e for r in found for e in r.history]
        times = [e["finished"] - e["started"] for e in entries]
        failed = sum(e["outcome"] in ("error", "lost") for e in entries)
        row = shown[func]
        assert (int(row["jobs"]), int(row["attempts"]), int(row["failed"])) == (len(found), len(entries), failed)
        assert row["failure-rate"] == f"{failed / len(entries) * 100:.1f} %"
        assert row["mean"] == _age(sum(times) / len(times)) and row["p95"] == _age(nearest_rank(times, 0.95))
    assert {shown[f]["attempts"] for f in shown if f.endswith(":flaky")} == {"3"}
    assert {shown[f]["failure-rate"] for f in shown if f.endswith(":flaky")} == {"66.7 %"}

    # Per worker: its concurrency, and the attempts it ended, counted against the runs written outside the queue.
    page = call(web, "GET", "/workers")[2]
    [worker] = queue.workers()
    concurrency = re.search(r'data-col="concurrency">(\d+)<', page)
    processed, failed_count = (re.search(rf'data-col="{c}">(\d+)<', page) for c in ("processed", "failed"))
    assert concurrency and processed and failed_count
    runs = len(store.runs.read_text().splitlines())
    assert (int(concurrency.group(1)), int(processed.group(1)), int(failed_count.group(1))) == (3, runs, 5)
    assert runs == 6 + 3 + 2 + 1 and worker.concurrency == 3

    # The icon: linked from every page and served where browsers look for it.
    status, headers, body = call(web, "GET", "/favicon.ico")
    assert status == 200 and headers["content-type"].startswith("image/svg+xml") and body.lstrip().startswith("<svg")
    assert '<link rel="icon" href="/static/favicon.svg"' in call(web, "GET", "/")[2]
    assert call(web, "GET", "/static/favicon.svg")[0] == 200


def test_the_figures_say_when_the_scan_budget_cut_them_short(sqlite_store: Store,
                                                             start_web: Callable[..., Web]) -> None:
    from skunkqueue_web.snapshot import SCAN_RECORDS

    from skunkqueue.testing.suite_support import make_record

    backend = sqlite_store.queue_handle().persistence
    for _ in range(3):
        backend.enqueue([make_record(sqlite_store.queue, "fast") for _ in range(SCAN_RECORDS // 2)])
    web = start_web(sqlite_store)
    started = time.monotonic()
    page = call(web, "GET", "/functions")[2]
    took = time.monotonic() - started
    assert "older jobs are not counted" in page and "newest jobs read in" in page
    jobs = int(cells(page, "functions", "func")["skunkqueue.testing.jobs:add"]["jobs"])
    assert 0 < jobs <= SCAN_RECORDS < 3 * (SCAN_RECORDS // 2), f"{jobs} jobs counted"
    assert took < 4.0, f"/functions took {took:.1f} s"  # the 0.5 s budget, one store call, a busy machine
