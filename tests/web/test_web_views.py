"""Jobs paging and filters, find by id, and dead letters acted on one, a selection, or all matching."""

from __future__ import annotations

import re
from html import unescape
from typing import Callable

from conftest import Store, Web
from test_web_security import TOKEN, call

from skunkqueue import policy


def rows(html: str) -> list[str]:
    """The job ids listed in a page's table, in order."""
    return re.findall(r'<td class="mono"><a href="/jobs/([0-9a-f]+)">', html)


def make_dead(store: Store, name: str, n: int) -> list[str]:
    """Fire ``n`` jobs and fail each once, as a worker would, so they end in the dead-letter list."""
    store.job(name).fire_many([("x",)] * n)
    backend = store.queue_handle().persistence
    ids = []
    for record in backend.claim("fast", "test-worker", 30, limit=n):
        error = {"type": "ValueError", "message": f"{name} failed", "traceback": "Traceback ..."}
        assert backend.finish(record.id, record.token, policy.failed(record, error))
        ids.append(record.id)
    assert len(ids) == n
    return ids


def next_page(page: str) -> str:
    found = re.search(r'<a href="([^"]+)" id="next-page">', page)
    assert found, "no next page link"
    return unescape(found.group(1))


def test_jobs_are_paged_filtered_and_found_by_id(sqlite_store: Store, start_web: Callable[..., Web]) -> None:
    handles = sqlite_store.job("add").fire_many([(i, i) for i in range(120)])
    booms = [sqlite_store.job("boom").fire(str(i)).ids[0] for i in range(5)]
    web = start_web(sqlite_store)
    fired = [h.id for h in handles] + booms
    newest = fired[::-1]
    first = call(web, "GET", "/jobs?size=50")[2]
    assert rows(first) == newest[:50]  # newest fired first, unless asked otherwise
    assert 'id="next-page"' in first
    second = call(web, "GET", next_page(first))[2]
    assert rows(second) == newest[50:100]
    last = call(web, "GET", next_page(second))[2]
    assert rows(last) == newest[100:] and 'id="next-page"' not in last
    assert 'id="first-page"' in last
    in_order = call(web, "GET", "/jobs?size=50&sort=store")[2]
    assert rows(in_order) == fired[:50]  # SQLite's own order: firing order
    assert rows(call(web, "GET", next_page(in_order))[2]) == fired[50:100]
    # A cursor of the other order is not this order's: the first page again.
    status, headers, _ = call(web, "GET", next_page(in_order).replace("sort=store", "sort=newest"))
    assert status == 303 and "not+valid" in headers["location"]
    # A cursor the store did not make: one line, and the first page.
    status, headers, _ = call(web, "GET", "/jobs?size=50&after=bogus")
    assert status == 303 and "not+valid" in headers["location"] and "after" not in headers["location"]
    assert rows(call(web, "GET", "/jobs?func=BOOM")[2]) == booms[::-1]        # any part, any case
    assert rows(call(web, "GET", "/jobs?state=complete")[2]) == []
    assert rows(call(web, "GET", "/jobs?route=nosuch")[2]) == []
    assert rows(call(web, "GET", "/jobs?state=bogus&size=7&sort=bogus")[2])[:2] == newest[:2]  # ignored
    status, headers, _ = call(web, "GET", f"/jobs?id={booms[2]}")
    assert status == 303 and headers["location"] == f"/jobs/{booms[2]}"
    status, _, missing = call(web, "GET", "/jobs/ffffffffffffffffffffffffff")
    assert status == 404 and "No job ffffffffffffffffffffffffff" in missing


def test_dead_letters_one_selection_or_all_matching(sqlite_store: Store, start_web: Callable[..., Web]) -> None:
    booms = make_dead(sqlite_store, "boom", 4)
    files = make_dead(sqlite_store, "needs_file", 3)
    web = start_web(sqlite_store, token=TOKEN)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert sorted(rows(call(web, "GET", "/dead")[2])) == sorted(booms + files)
    assert rows(call(web, "GET", "/dead?sort=newest")[2]) == (booms + files)[::-1]  # ids follow firing order
    # One: remove it from the list (the record stays until it expires).
    assert call(web, "POST", f"/jobs/{booms[0]}/dismiss", {}, headers=bearer)[0] == 303
    record = sqlite_store.queue_handle().get(booms[0])
    assert record is not None and record.state == "error" and not record.dead
    # A selection: retry two of them.
    status, headers, _ = call(web, "POST", "/dead", {"action": "retry", "scope": "selected", "ids": files[0]},
                              headers=bearer)
    assert status == 303 and "Requeued+1" in headers["location"]
    assert sqlite_store.queue_handle().get(files[0]).state == "pending"  # type: ignore[union-attr]
    # All matching a filter: every remaining dead boom, and nothing else.
    status, headers, _ = call(web, "POST", "/dead", {"action": "dismiss", "scope": "matching", "func": "boom"},
                              headers=bearer)
    assert status == 303 and "Removed+3" in headers["location"]
    assert sorted(rows(call(web, "GET", "/dead")[2])) == sorted(files[1:])
    status, headers, _ = call(web, "POST", "/dead", {"action": "retry", "scope": "matching", "route": "fast"},
                              headers=bearer)
    assert "Requeued+2" in headers["location"]
    assert rows(call(web, "GET", "/dead")[2]) == []
    assert sqlite_store.queue_handle().counts() == {("fast", "pending"): 3, ("fast", "error"): 4}
    # A job that is not a dead letter is left alone.
    assert "not+a+dead+letter" in call(web, "POST", f"/jobs/{booms[1]}/dismiss", {}, headers=bearer)[1]["location"]


def test_a_workflow_member_links_its_parents_and_dependents(store: Store, start_web: Callable[..., Web]) -> None:
    import pytest

    from skunkqueue import chain

    add = store.job("add")
    if not add.queue.persistence.supports_workflows:
        pytest.skip(f"the {store.backend} backend does not support workflows (supports_workflows = False)")
    handle = chain(add.s(1, 2), add.s(3)).fire()
    first, second = (h.id for h in handle.jobs)
    web = start_web(store)
    status, _, page = call(web, "GET", f"/jobs/{second}")
    assert status == 200
    assert "when its parents have finished" in page and handle.id in page
    assert re.search(rf'id="parents"><a class="mono" href="/jobs/{first}">{first}</a> '
                     r'<span class="pill state-pending">pending</span>', page)
    status, _, page = call(web, "GET", f"/jobs/{first}")
    assert status == 200 and re.search(rf'id="dependents"><a class="mono" href="/jobs/{second}">', page)


def test_a_jobs_page_shows_its_trace_id_and_its_arguments_without_headers(sqlite_store: Store,
                                                                          start_web: Callable[..., Web]) -> None:
    import dataclasses

    from skunkqueue import headers as record_headers
    from skunkqueue.record import new_id

    handle = sqlite_store.job("add").fire(2, 3)
    backend = sqlite_store.queue_handle().persistence
    template = backend.get(handle.id)
    assert template is not None
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    traced = dataclasses.replace(template, id=new_id(), payload=record_headers.wrap(
        {"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}, template.payload))
    backend.enqueue([traced])
    web = start_web(sqlite_store)
    page = call(web, "GET", f"/jobs/{traced.id}")[2]
    assert 'id="trace-id"' in page and trace in page
    assert re.search(r'id="arguments">[^<]*2,\s*3', unescape(page)), "the arguments lost to the headers"
    assert 'id="trace-id"' not in call(web, "GET", f"/jobs/{handle.id}")[2]
