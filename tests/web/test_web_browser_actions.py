"""The schedules view and dead-letter deletion in a real headless Chromium, on SQLite and on a real redis-server."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from conftest import Store, Web, shot
from playwright.sync_api import expect

from skunkqueue import periodic

TOKEN = "t0ken-for-tests"
HOURLY = "webperiodic:hourly"


def sign_in(page: Any, web: Web) -> None:
    page.goto(web.base + "/login")
    page.fill("#token", TOKEN)
    page.click("#sign-in")
    page.wait_for_url(web.base + "/?msg=Signed+in")


def until(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_pause_resume_and_run_a_schedule_from_the_page(store: Store, start_web: Callable[..., Web],
                                                       start_pool: Callable[[Store], Any], page: Any,
                                                       tmp_path: Path) -> None:
    web = start_web(store, "--import", "webperiodic", token=TOKEN)
    start_pool(store)
    backend = store.queue_handle().persistence
    sign_in(page, web)
    page.goto(web.base + "/periodic")
    row = page.locator(f'#schedules tr[data-schedule="{HOURLY}"]')
    assert "active" in row.locator('[data-col="state"]').inner_text()
    assert "UTC" in row.locator('[data-col="next"]').inner_text()
    # The hostile route name of the other schedule is text on the page, not an element.
    assert page.locator("#schedules i").count() == 0 and "<i>fast</i>" in page.locator("#schedules").inner_text()
    shot(page, tmp_path, f"periodic-{store.backend}")

    row.locator('button[data-act="pause"]').click()
    page.wait_for_selector(".flash")
    assert f"{HOURLY}: paused." in page.locator(".flash").inner_text()
    assert periodic.is_paused(backend, HOURLY)
    row = page.locator(f'#schedules tr[data-schedule="{HOURLY}"]')
    assert "paused" in row.locator('[data-col="state"]').inner_text()
    assert row.locator('[data-col="next"]').inner_text().strip() == "-"
    shot(page, tmp_path, f"periodic-paused-{store.backend}")
    row.locator('button[data-act="resume"]').click()
    page.wait_for_selector(".flash")
    assert not periodic.is_paused(backend, HOURLY)

    row = page.locator(f'#schedules tr[data-schedule="{HOURLY}"]')
    row.locator('button[data-act="run"]').click()       # asks first; the fixture accepts confirmations
    page.wait_for_selector(".flash")
    assert "fired as" in page.locator(".flash").inner_text()
    assert ("confirm", f"Fire {HOURLY} once now?") in page.dialogs
    until(lambda: store.runs_of("hourly") >= 1)
    time.sleep(1)
    assert store.runs_of("hourly") == 1                  # counted outside the queue: exactly one run
    assert all(kind == "confirm" for kind, _ in page.dialogs)


def test_delete_dead_letters_selected_then_all_matching(store: Store, start_web: Callable[..., Web],
                                                        start_pool: Callable[[Store], Any], page: Any,
                                                        tmp_path: Path) -> None:
    web = start_web(store, token=TOKEN)
    start_pool(store)
    boom = store.job("boom")
    ids = [boom.fire(f"<script>alert({i})</script>").ids[0] for i in range(4)]
    q = store.queue_handle()
    until(lambda: sum(r.dead for r in q.persistence.summary().routes) == 4)
    assert store.runs_of("boom") == 4
    sign_in(page, web)
    page.goto(web.base + "/dead")
    shot(page, tmp_path, f"dead-before-delete-{store.backend}")
    page.check(f'input[name=ids][value="{ids[0]}"]')
    page.click("#bulk-delete")
    page.wait_for_selector(".flash")
    assert "Deleted 1 dead letter(s)." in page.locator(".flash").inner_text()
    assert ("confirm", "Delete, for good, 1 selected dead letter(s)?") in page.dialogs
    assert q.get(ids[0]) is None and all(q.get(i) is not None for i in ids[1:])

    page.goto(web.base + "/dead?func=boom")
    page.select_option("select[name=scope]", "matching")
    page.click("#bulk-delete")
    page.wait_for_selector(".flash")
    assert "Deleted 3 dead letter(s)." in page.locator(".flash").inner_text()
    assert ("confirm", "Delete, for good, every dead letter matching the filter?") in page.dialogs
    assert all(q.get(i) is None for i in ids)
    assert page.locator(".empty").inner_text() == "No jobs match."
    shot(page, tmp_path, f"dead-after-delete-{store.backend}")
    # The overview's counts follow without a reload.
    page.goto(web.base + "/")
    expect(page.locator("#dead-total")).to_have_text("0", timeout=30_000)
    assert store.runs_of("boom") == 4                     # deleting ran nothing
    assert all(kind == "confirm" for kind, _ in page.dialogs)  # no injected script ever ran
