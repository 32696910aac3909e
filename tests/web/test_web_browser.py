"""The monitor in a real headless Chromium against a real pool, on SQLite and on a real redis-server."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from conftest import Store, Web, shot
from playwright.sync_api import expect

from skunkqueue.testing.suite_support import wait_until

TOKEN = "t0ken-for-tests"


def cell(page: Any, route: str, state: str) -> int:
    return int(page.locator(f'#routes tr[data-route="{route}"] td[data-state="{state}"]').inner_text())


def wait_cell(page: Any, route: str, state: str, value: int, timeout: float = 30) -> None:
    # Playwright's own waiting (not wait_for_function: its string predicates run through eval, which the
    # monitor's Content-Security-Policy rightly refuses once the first check fails).
    expect(page.locator(f'#routes tr[data-route="{route}"] td[data-state="{state}"]')).to_have_text(
        str(value), timeout=timeout * 1000)


def test_live_overview_traceback_and_dead_letter_retry(store: Store, start_web: Callable[..., Web],
                                                      start_pool: Callable[[Store], Any], page: Any,
                                                      tmp_path: Path) -> None:
    web = start_web(store, token=TOKEN)
    start_pool(store)
    store.job("add").fire(0, 0)  # one job first, so the route exists before the page loads
    page.goto(web.base + "/")
    wait_cell(page, "fast", "complete", 1)
    # A marker on the window survives only if the page is never reloaded.
    page.evaluate("window.__notReloaded = true")
    add = store.job("add")
    for i in range(12):
        add.fire(i, i)
    wait_cell(page, "fast", "complete", 13)
    assert page.evaluate("window.__notReloaded") is True
    assert store.runs_of("add") == 13

    hostile = "<script>alert(1)</script>"
    failed = store.job("boom").fire(hostile)
    fix = tmp_path / "fixed"
    dead = store.job("needs_file").fire(str(fix))
    wait_cell(page, "fast", "error", 2)
    assert page.locator("#dead-total").inner_text() == "2"
    assert page.evaluate("window.__notReloaded") is True
    # Throughput comes from the workers' counters where the backend keeps them, and says so where it doesn't.
    keeps = store.queue_handle().persistence.keeps_stats
    assert page.locator("svg.chart").count() == (1 if keeps else 0)
    assert page.locator("#no-stats").count() == (0 if keeps else 1)
    shot(page, tmp_path, f"overview-{store.backend}")

    # Find the failed job through the jobs view, open it, read its traceback.
    page.goto(web.base + "/jobs?state=error")
    page.locator(f'a[href="/jobs/{failed.ids[0]}"]').click()
    page.wait_for_selector("#traceback")
    traceback = page.locator("#traceback").inner_text()
    assert "ValueError: cannot handle <script>alert(1)</script>" in traceback
    assert "raise ValueError" in traceback and "webjobs.py" in traceback
    assert hostile in page.locator("#arguments").inner_text()  # shown as text
    assert page.locator("#arguments script").count() == 0       # never as an element
    shot(page, tmp_path, f"job-{store.backend}")
    page.goto(web.base + "/jobs")
    shot(page, tmp_path, f"jobs-{store.backend}")

    # Sign in, retry the dead letter from its page after fixing its cause, watch it complete.
    page.goto(web.base + "/login")
    page.fill("#token", TOKEN)
    page.click("#sign-in")
    page.wait_for_url(web.base + "/?msg=Signed+in")
    page.goto(web.base + "/dead")
    shot(page, tmp_path, f"dead-{store.backend}")
    assert store.runs_of("needs_file") == 1
    fix.write_text("ok")
    page.check(f'input[name=ids][value="{dead.ids[0]}"]')
    page.click("#bulk-retry")
    page.wait_for_selector(".flash")
    assert "Requeued 1 dead letter(s)." in page.locator(".flash").inner_text()
    page.goto(web.base + f"/jobs/{dead.ids[0]}")
    expect(page.locator("#job-state")).to_have_text("complete", timeout=30_000)
    assert page.locator("#result").inner_text().strip() == '"fixed"'
    assert store.runs_of("needs_file") == 2
    assert store.runs_of("boom") == 1

    page.goto(web.base + "/workers")
    rows = page.locator("#workers tbody tr")
    assert rows.count() >= 1 and "fast" in rows.first.inner_text()
    shot(page, tmp_path, f"workers-{store.backend}")
    page.goto(web.base + "/")
    shot(page, tmp_path, f"overview-signed-in-{store.backend}")
    # Bulk actions ask first; nothing else opened a dialog (no injected script ever ran).
    assert page.dialogs == [("confirm", "Retry 1 selected dead letter(s)?")]


def test_updates_pause_while_the_tab_is_hidden(sqlite_store: Store, start_web: Callable[..., Web], page: Any) -> None:
    web = start_web(sqlite_store)
    sqlite_store.job("add").fire(1, 1)
    page.goto(web.base + "/")
    wait_cell(page, "fast", "pending", 1)
    # Count the live requests the page makes while visible, then while hidden.
    page.evaluate("""() => { window.__polls = 0; const f = window.fetch;
                    window.fetch = (...a) => { window.__polls++; return f(...a); }; }""")
    # The page slows its pace to 4x a slow answer's time (a loaded machine answers slowly too), so
    # it is given until two requests came, and then three times the pace it kept, hidden.
    started = time.monotonic()
    # (Playwright's wait_for_function would need the eval the page's CSP forbids.)
    wait_until(lambda: page.evaluate("window.__polls") >= 2, timeout=30, what="two updates of the visible page")
    pace = (time.monotonic() - started) / 2
    page.evaluate("""() => { Object.defineProperty(document, 'hidden', {value: true, configurable: true});
                    document.dispatchEvent(new Event('visibilitychange')); window.__polls = 0; }""")
    time.sleep(max(2.0, 3 * pace))
    hidden = page.evaluate("window.__polls")
    assert hidden == 0, hidden


def test_a_slow_store_is_polled_less_often(sqlite_store: Store, start_web: Callable[..., Web], page: Any) -> None:
    web = start_web(sqlite_store)  # asks for updates every 0.5 s
    sqlite_store.job("add").fire(1, 1)
    page.goto(web.base + "/jobs")
    page.wait_for_selector("#jobs")
    # Make every live answer take a second, as a large queue on a scanning store would.
    page.evaluate("""() => { window.__polls = 0; const f = window.fetch;
                    window.fetch = (...a) => { window.__polls++;
                      return new Promise(r => setTimeout(() => r(f(...a)), 1000)); }; }""")
    time.sleep(6.5)
    # At a fixed 0.5 s pace this would be 4 or more; waiting 4x the answer time allows at most 2.
    assert 1 <= page.evaluate("window.__polls") <= 2
