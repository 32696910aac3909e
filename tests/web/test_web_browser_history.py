"""A job's history, newest-first listings, error search, the functions and workers pages and the
icon, in a real headless Chromium against a real pool (on SQLite, Redis and PostgreSQL)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

from conftest import Store, Web, shot
from playwright.sync_api import expect

from skunkqueue.testing.suite_support import wait_until


def test_history_of_a_killed_worker_and_of_retries_in_the_browser(store: Store, start_web: Callable[..., Web],
                                                                   start_pool: Callable[..., Any], page: Any,
                                                                   tmp_path: Path) -> None:
    start_pool(store, "--async-concurrency", "4")
    queue = store.queue_handle()
    wait_until(lambda: queue.workers(), timeout=30, what="the worker to register")
    # Attempt 1 runs on a worker that is killed (SIGKILL); the pool's next worker runs attempt 2.
    slow = store.job("slow").fire(1.5)
    wait_until(lambda: store.runs_of("slow") == 1, timeout=30, what="the slow job to start")
    [first] = queue.workers()
    os.kill(first.pid, signal.SIGKILL)
    assert slow.wait(timeout=60) == 1.5
    flaky = store.job("flaky", retries=2, retry_backoff=0.05).fire("flaky", 2)
    assert flaky.wait(timeout=60) == 3
    for i in range(3):
        store.job("add").fire(i, i).wait(timeout=30)
    web = start_web(store)

    # The job page of the killed worker's job: attempt 1 lost on the killed worker, attempt 2 complete.
    page.goto(web.base + f"/jobs/{slow.id}")
    history = page.locator("#history tbody tr")
    expect(history).to_have_count(2)
    assert history.nth(0).locator(".outcome-pill").inner_text() == "lost"
    assert f"/ {first.pid}" in history.nth(0).inner_text() and "WorkerDied" in history.nth(0).inner_text()
    assert first.id in history.nth(0).inner_text()
    assert history.nth(1).locator(".outcome-pill").inner_text() == "complete"
    shot(page, tmp_path, f"history-lost-{store.backend}")

    # Newest fired first by default; the three adds were fired last.
    page.goto(web.base + "/jobs")
    assert page.locator("#sort").input_value() == "newest"
    listed = page.locator("#jobs tbody tr td.mono a").all_inner_texts()
    assert listed[:5] == sorted(listed, reverse=True)[:5] and len(listed) == 5
    shot(page, tmp_path, f"jobs-newest-{store.backend}")
    # Search by error type through the form: the flaky job timed out twice before it completed.
    page.fill("#error-filter", "timeout")
    page.locator("form.filters button").first.click()
    page.wait_for_url("**error=timeout**")
    expect(page.locator("#jobs tbody tr")).to_have_count(1)
    page.locator(f'a[href="/jobs/{flaky.id}"]').click()
    outcomes = page.locator("#history .outcome-pill")
    expect(outcomes).to_have_count(3)
    assert outcomes.all_inner_texts() == ["error", "error", "complete"]
    page.locator("#history details summary").first.click()
    unfolded = page.locator("#history details pre").first
    expect(unfolded).to_be_visible()
    # The page keeps refreshing itself, but not while a traceback is unfolded: it stays open.
    time.sleep(2.0)
    expect(unfolded).to_be_visible()
    assert "TimeoutError: flaky: run 1 timed out" in unfolded.inner_text()
    shot(page, tmp_path, f"history-retries-{store.backend}")

    page.goto(web.base + "/functions")
    flaky_row = page.locator('#functions tr[data-func$=":flaky"]')
    assert flaky_row.locator('[data-col="failure-rate"]').inner_text() == "66.7 %"
    assert flaky_row.locator('[data-col="attempts"]').inner_text() == "3"
    shot(page, tmp_path, f"functions-{store.backend}")

    page.goto(web.base + "/workers")
    [now] = queue.workers()
    row = page.locator("#workers tbody tr").first
    assert row.locator('[data-col="concurrency"]').inner_text() == "4" and now.concurrency == 4
    # The replacement worker ended every attempt but the lost one (slow 1, flaky 3, add 3); its
    # failures are the two timeouts.
    assert row.locator('[data-col="processed"]').inner_text() == "7"
    assert row.locator('[data-col="failed"]').inner_text() == "2"
    shot(page, tmp_path, f"workers-counts-{store.backend}")

    # The icon Chromium fetched for the page, and what it looks like.
    icon = page.evaluate("document.querySelector('link[rel=icon]').href")
    assert icon == web.base + "/static/favicon.svg"
    answer = page.request.get(web.base + "/favicon.ico")
    assert answer.status == 200 and answer.headers["content-type"].startswith("image/svg+xml")
    page.set_content(f'<img id="icon" src="{icon}" width="64" height="64">')
    expect(page.locator("#icon")).to_have_js_property("complete", True)
    assert page.evaluate("document.getElementById('icon').naturalWidth") > 0  # Chromium drew it
    path = tmp_path / "screens" / f"favicon-{store.backend}.png"
    page.locator("#icon").screenshot(path=str(path))
    keep = os.environ.get("SKUNQ_WEB_SCREENS")
    if keep:
        (Path(keep) / path.name).write_bytes(path.read_bytes())
