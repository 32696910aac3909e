"""The schedules view and dead-letter deletion against a real `skunq web` (and a real pool where a job must run).

Each action is tried the ways it must be refused (read-only, no session, no CSRF value, another
site) and then done, and the store itself is read to see what changed; job runs are counted in
an append-only file outside the queue.
"""

from __future__ import annotations

import re
import time
from typing import Any, Callable

from conftest import Store, Web
from test_web_security import TOKEN, call, sign_in

from skunkqueue import periodic
from skunkqueue.record import ERROR, Outcome

EVIL = {"Origin": "http://evil.example"}


def schedules_of(web: Web, cookie: str | None = None) -> dict[str, str]:
    """name -> the row's HTML, from the schedules page."""
    _, _, page = call(web, "GET", "/periodic", headers={"Cookie": cookie} if cookie else None)
    return dict(re.findall(r'<tr data-schedule="([^"]+)">(.*?)</tr>', page, re.S))


def dead_letters(store: Store, count: int, route: str = "fast") -> list[str]:
    """``count`` dead letters made the way a worker makes them (claim, then a final failure)."""
    q = store.queue_handle()
    handle = store.job("boom").fire
    ids = [handle(f"n{i}").ids[0] for i in range(count)]
    backend = q.persistence
    taken = backend.claim(route, "test-worker", 30, limit=count)
    assert sorted(r.id for r in taken) == sorted(ids)
    for record in taken:
        assert backend.finish(record.id, record.token, Outcome(ERROR, error={"type": "ValueError",
                                                                              "message": "no", "traceback": ""},
                                                                dead=True))
    return ids


def test_schedules_are_listed_and_paused_resumed_and_run_with_the_token(
        store: Store, start_web: Callable[..., Web], start_pool: Callable[[Store], Any]) -> None:
    web = start_web(store, "--import", "webperiodic", token=TOKEN)
    rows = schedules_of(web)
    hourly, nightly = "webperiodic:hourly", "webperiodic:nightly"
    assert set(rows) == {hourly, nightly}, rows
    assert "every 3600 s" in rows[hourly] and "active" in rows[hourly]
    assert "cron &#39;0 3 * * *&#39; UTC" in rows[nightly]
    # A route name is shown as text, never as markup.
    assert "&lt;i&gt;fast&lt;/i&gt;" in rows[nightly] and "<i>" not in rows[nightly]
    # The next slot is the schedule's own (periodic.py), shown in UTC.
    next_hour = time.strftime("%Y-%m-%d %H:00:00 UTC", time.gmtime((time.time() // 3600 + 1) * 3600))
    assert next_hour in rows[hourly]

    backend = store.queue_handle().persistence
    form = {"name": hourly, "action": "pause"}
    assert call(web, "POST", "/periodic", form)[0] == 403                                      # no session
    cookie, csrf = sign_in(web)
    assert call(web, "POST", "/periodic", form, headers={"Cookie": cookie})[0] == 403          # no CSRF value
    assert call(web, "POST", "/periodic", {**form, "csrf": csrf}, headers={"Cookie": cookie, **EVIL})[0] == 403
    assert not periodic.is_paused(backend, hourly), "a refused request paused the schedule"
    status, headers, _ = call(web, "POST", "/periodic", {**form, "csrf": csrf}, headers={"Cookie": cookie})
    assert status == 303 and "paused" in headers["location"]
    assert periodic.is_paused(backend, hourly)      # the same setting `skunq periodic pause` writes
    row = schedules_of(web, cookie)[hourly]
    assert "paused" in row and 'data-col="next">-<' in row and 'value="resume"' in row
    call(web, "POST", "/periodic", {"name": hourly, "action": "resume", "csrf": csrf}, headers={"Cookie": cookie})
    assert not periodic.is_paused(backend, hourly)
    assert call(web, "POST", "/periodic", {"name": "nosuch", "action": "run", "csrf": csrf},
                headers={"Cookie": cookie})[0] == 404

    # Run now: exactly one extra run, by a real pool.
    start_pool(store)
    status, headers, _ = call(web, "POST", "/periodic", {"name": hourly, "action": "run", "csrf": csrf},
                              headers={"Cookie": cookie})
    assert status == 303 and "fired" in headers["location"]
    deadline = time.monotonic() + 30
    while store.runs_of("hourly") < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    assert store.runs_of("hourly") == 1
    # Outside the slot sequence: the schedule's last fired slot is not moved by it.
    assert periodic.last_slot(backend, hourly) is None


def test_schedule_actions_refused_when_read_only(sqlite_store: Store, start_web: Callable[..., Web]) -> None:
    web = start_web(sqlite_store, "--import", "webperiodic")
    name = next(iter(schedules_of(web)))
    status, _, text = call(web, "POST", "/periodic", {"name": name, "action": "pause"},
                           headers={"Authorization": "Bearer anything"})
    assert status == 403 and "read-only" in text
    assert not periodic.is_paused(sqlite_store.queue_handle().persistence, name)
    assert 'value="pause"' not in call(web, "GET", "/periodic")[2]


def test_without_imports_the_view_says_how_to_see_schedules(sqlite_store: Store,
                                                            start_web: Callable[..., Web]) -> None:
    web = start_web(sqlite_store)
    _, _, page = call(web, "GET", "/periodic")
    assert 'id="no-schedules"' in page and "--import MODULE" in page


def test_dead_letters_deleted_one_selected_and_matching(store: Store, start_web: Callable[..., Web]) -> None:
    web = start_web(store, token=TOKEN)
    ids = dead_letters(store, 6)
    alive = store.job("add").fire(1, 1).ids[0]            # pending: never deleted by this page
    q = store.queue_handle()
    cookie, csrf = sign_in(web)
    # Refused ways first: nothing may be deleted by them.
    assert call(web, "POST", f"/jobs/{ids[0]}/delete", {})[0] == 403
    assert call(web, "POST", f"/jobs/{ids[0]}/delete", {"csrf": csrf}, headers={"Cookie": cookie, **EVIL})[0] == 403
    assert call(web, "POST", "/dead", {"action": "delete", "scope": "matching", "csrf": csrf},
                headers={"Cookie": cookie, **EVIL})[0] == 403
    assert all(q.get(i) is not None for i in ids)

    status, headers, _ = call(web, "POST", f"/jobs/{ids[0]}/delete", {"csrf": csrf}, headers={"Cookie": cookie})
    assert status == 303 and "Deleted" in headers["location"]
    assert q.get(ids[0]) is None
    # A pending job is not deleted, even when named.
    call(web, "POST", f"/jobs/{alive}/delete", {"csrf": csrf}, headers={"Cookie": cookie})
    call(web, "POST", "/dead", [("action", "delete"), ("scope", "selected"), ("csrf", csrf),  # type: ignore[arg-type]
                                ("ids", ids[1]), ("ids", ids[2]), ("ids", alive)], headers={"Cookie": cookie})
    assert q.get(ids[1]) is None and q.get(ids[2]) is None and q.get(alive) is not None
    # All matching a filter: a filter that matches nothing deletes nothing, then the route's all go.
    call(web, "POST", "/dead", {"action": "delete", "scope": "matching", "func": "nosuch", "csrf": csrf},
         headers={"Cookie": cookie})
    assert all(q.get(i) is not None for i in ids[3:])
    status, headers, _ = call(web, "POST", "/dead", {"action": "delete", "scope": "matching", "route": "fast",
                                                     "func": "boom", "csrf": csrf}, headers={"Cookie": cookie})
    assert "Deleted+3" in headers["location"], headers["location"]
    assert all(q.get(i) is None for i in ids)
    summary = {r.route: r for r in q.persistence.summary().routes}
    assert summary["fast"].dead == 0 and summary["fast"].states["error"] == 0
    assert summary["fast"].states["pending"] == 1
