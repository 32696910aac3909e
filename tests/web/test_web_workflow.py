"""A workflow in the monitor: every member and its state, reached from the job page of any member."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import Store, Web, shot
from playwright.sync_api import expect
from test_web_security import call
from test_web_views import rows

from skunkqueue.testing.suite_support import wait_until


def fire_workflow(store: Store) -> tuple[Any, list[str]]:
    """A chain whose middle step fails (so the last one ends killed), then a group, and an outsider."""
    from skunkqueue import chain, group

    add, boom = store.job("add"), store.job("boom")
    if not add.queue.persistence.supports_workflows:
        pytest.skip(f"the {store.backend} backend does not support workflows (supports_workflows = False)")
    store.job("add").fire(100, 100)  # fired before: not a member
    handle = chain(add.s(1, 2), boom.s(), group(add.s(5), add.s(6))).fire()
    store.job("add").fire(200, 200)  # fired after: not a member either
    return handle, [h.id for h in handle.jobs]


def test_the_jobs_page_lists_exactly_the_members_of_a_workflow(store: Store, start_web: Callable[..., Web]) -> None:
    handle, members = fire_workflow(store)
    web = start_web(store)
    status, _, page = call(web, "GET", f"/jobs?workflow={handle.id}&size=100")
    assert status == 200 and 'id="workflow-filter"' in page and handle.id in page
    assert sorted(rows(page)) == sorted(members)
    # Each member's page links to that listing.
    for member in members:
        assert f'href="/jobs?workflow={handle.id}"' in call(web, "GET", f"/jobs/{member}")[2]
    # The filter is kept by the other filters' form and by the pager.
    assert f'name="workflow" value="{handle.id}"' in page
    # No worker runs here: every member is pending, none complete.
    assert sorted(rows(call(web, "GET", f"/jobs?workflow={handle.id}&state=pending&size=100")[2])) == sorted(members)
    assert rows(call(web, "GET", f"/jobs?workflow={handle.id}&state=complete")[2]) == []


def test_a_hostile_workflow_id_finds_nothing_and_is_escaped(sqlite_store: Store,
                                                            start_web: Callable[..., Web]) -> None:
    fire_workflow(sqlite_store)
    web = start_web(sqlite_store)
    hostile = '"><script>alert(1)</script>{}:$.'
    status, _, page = call(web, "GET", "/jobs?workflow=" + re.sub(r"[^A-Za-z0-9]", lambda m: f"%{ord(m[0]):02X}",
                                                                   hostile))
    assert status == 200 and rows(page) == [] and "No jobs match." in page
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page


def test_a_workflow_in_the_browser(sqlite_store: Store, start_web: Callable[..., Web],
                                   start_pool: Callable[..., Any], page: Any, tmp_path: Path) -> None:
    handle, members = fire_workflow(sqlite_store)
    start_pool(sqlite_store)
    first, failed, killed, other = members
    queue = sqlite_store.queue_handle()
    wait_until(lambda: all(r is not None and r.state in ("complete", "error", "killed")
                           for r in queue.persistence.get_many(members)), timeout=60, what="the workflow to end")
    web = start_web(sqlite_store)
    # From the failed step's page to its workflow, and on to the step it left killed.
    page.goto(web.base + f"/jobs/{failed}")
    page.locator("#workflow a").click()
    expect(page.locator("#workflow-filter")).to_contain_text(handle.id)
    listed = page.locator("#jobs tbody tr")
    expect(listed).to_have_count(4)
    states = {row.locator("a").first.inner_text(): row.locator(".pill").first.inner_text()
              for row in listed.all()}
    assert states == {first: "complete", failed: "error", killed: "killed", other: "killed"}
    # The killed ones were never released: their due reads so, not as the year 5138.
    dues = [row.locator("td").nth(6).inner_text() for row in listed.all()]
    assert dues.count("after its parents") == 2 and not any("5138" in due for due in dues), dues
    shot(page, tmp_path, "workflow-members")
    page.locator(f'a[href="/jobs/{killed}"]').click()
    expect(page.locator("#error-line")).to_contain_text("DependencyFailed")
