"""Every jobs page answers in bounded time whatever the store holds, and continued pages find every match.

A function filter that matches nothing among 60,000 jobs read them all in one
request (12-14 s per 100,000 on Redis; SQLite's offset cursor re-read every
earlier page: 459 s). A page now stops after its scan budget with what it
found, says so, and links to where the search continues.
"""

from __future__ import annotations

import re
import time
from html import unescape
from typing import Callable

from conftest import Store, Web
from test_web_security import call
from test_web_views import rows

from skunkqueue.testing.suite_support import make_record

JOBS = 60_000
BATCH = 5_000
NEEDLE_AT = (0, 29_999, JOBS - 1)       # first, middle and last job stored
# The page's scan budget is 0.5 s; the rest is one store call, rendering and a busy 2-core machine.
BOUND = 4.0


def fill(store: Store) -> list[str]:
    """JOBS pending jobs in batches through the protocol; the ids of the few whose function is a needle."""
    backend = store.queue_handle().persistence
    needles = []
    for start in range(0, JOBS, BATCH):
        batch = [make_record(store.queue, "fast") for _ in range(BATCH)]
        for i, record in enumerate(batch, start):
            if i in NEEDLE_AT:
                record.func = "needle_jobs:Find_Me"
                needles.append(record.id)
        backend.enqueue(batch)
    return needles


def timed_get(web: Web, path: str) -> tuple[str, float]:
    started = time.monotonic()
    status, _, page = call(web, "GET", path)
    took = time.monotonic() - started
    assert status == 200, page
    return page, took


def follow(web: Web, path: str) -> tuple[list[str], int, float]:
    """Every row of a listing, page after continued page: (ids, requests, slowest answer)."""
    seen: list[str] = []
    requests, slowest = 0, 0.0
    url: str | None = path
    while url is not None:
        page, took = timed_get(web, url)
        requests, slowest = requests + 1, max(slowest, took)
        seen += rows(page)
        found = re.search(r'<a href="([^"]+)" id="next-page">', page)
        url = unescape(found.group(1)) if found else None
        assert requests < 500, "paging did not end"
    return seen, requests, slowest


def test_a_filter_matching_almost_nothing_answers_in_bounded_time(store: Store,
                                                                   start_web: Callable[..., Web]) -> None:
    needles = fill(store)
    web = start_web(store)
    page, took = timed_get(web, "/jobs?func=nomatch")
    assert took < BOUND, f"/jobs?func=nomatch took {took:.1f} s over {JOBS} jobs"
    assert 'id="partial-page"' in page and 'id="continue-search"' in page and rows(page) == []
    assert "No jobs match among those looked at so far." in page
    # Continued pages find every match once, each answered within the bound.
    seen, requests, slowest = follow(web, "/jobs?func=find_me&size=50")
    assert sorted(seen) == sorted(needles), f"{len(seen)} matches found, not {len(needles)}"
    assert slowest < BOUND, f"a continued page took {slowest:.1f} s"
    assert requests > 1, "60,000 jobs were read in one request"
    # A page deep into the unfiltered listing is as quick as the first.
    last = follow(web, "/jobs?size=200&state=pending")
    assert len(last[0]) == JOBS and last[2] < BOUND, f"{len(last[0])} rows, slowest page {last[2]:.1f} s"
    # The dead-letter page pages the same way: nothing there, answered at once.
    page, took_dead = timed_get(web, "/dead?func=nomatch")
    assert took_dead < BOUND and rows(page) == [] and "No jobs match" in page
    print(f"\n{store.backend}: nomatch {took:.2f} s; find_me {requests} requests, slowest {slowest:.2f} s; "
          f"unfiltered {last[1]} pages, slowest {last[2]:.2f} s")
