"""The monitor's flow control: per route, paused, its limits and the jobs waiting on them; /metrics too."""

from __future__ import annotations

import html
import time
from typing import Callable

import pytest
from conftest import Store, Web
from test_web_metrics import samples, value


def test_paused_and_limited_routes_show_on_the_overview_and_in_metrics(store: Store,
                                                                        start_web: Callable[..., Web]) -> None:
    queue = store.queue_handle()
    if not (queue.persistence.supports_pause and queue.persistence.supports_limits):
        pytest.skip(f"the {store.backend} backend enforces no pauses or limits yet: the monitor shows none")
    web = start_web(store)
    handles = [store.job("add").fire(n, n) for n in range(3)]
    queue.pause("fast")
    queue.limit("fast", concurrency=20, rate="50/s", burst=5)
    q = store.queue
    deadline = time.monotonic() + 15
    while value(found := samples(web), "skunkqueue_jobs_waiting_on_limit", queue=q, route="fast") != 3:
        assert time.monotonic() < deadline, found
        time.sleep(0.2)
    assert value(found, "skunkqueue_route_paused", queue=q, route="fast") == 1
    assert value(found, "skunkqueue_route_limit_concurrency", queue=q, route="fast") == 20
    assert value(found, "skunkqueue_route_limit_rate_per_second", queue=q, route="fast") == 50
    status, page = web.get("/")
    assert status == 200
    page = html.unescape(page)
    cell = page.split('data-flow="fast">', 1)[1].split("</td>", 1)[0]
    assert "paused" in cell and "concurrency=20 rate=50/s burst=5" in cell
    assert page.split('data-waiting="fast">', 1)[1].split("<", 1)[0] == "3"
    queue.resume("fast")
    queue.limit("fast")
    deadline = time.monotonic() + 15
    # Two writes to the store: the monitor's background snapshot may be taken between them, so wait
    # for both to show.
    while (value(found := samples(web), "skunkqueue_route_paused", queue=q, route="fast") != 0
           or value(found, "skunkqueue_route_limit_concurrency", queue=q, route="fast") is not None):
        assert time.monotonic() < deadline, found
        time.sleep(0.2)
    assert value(found, "skunkqueue_jobs_waiting_on_limit", queue=q, route="fast") == 0
    assert all(handle.state == "pending" for handle in handles)  # nobody works this queue: still there
    queue.close()
