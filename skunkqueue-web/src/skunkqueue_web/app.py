"""The Starlette application: pages, live fragments, actions and /metrics.

Handlers are plain functions, which Starlette runs in its thread pool; each
thread gets its own backend connection (``SkunkQueue.persistence`` is
per-thread), so a slow store never blocks the event loop.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from skunkqueue import dependencies, headers, periodic, serializer
from skunkqueue.errors import SkunkQueueError
from skunkqueue.metrics import BUCKETS
from skunkqueue.persistence import Persistence
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import ERROR, FINISHED_STATES, STATES, JobRecord, Outcome
from skunkqueue_web import charts, prometheus, snapshot
from skunkqueue_web.refresher import Refresher
from skunkqueue_web.security import COOKIE, Guard

HERE = Path(__file__).parent
PAGE_SIZES = (25, 50, 100, 200)
# Bulk dead-letter actions act on at most this many records per click.
BULK_LIMIT = 10_000


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _short(ts: float | None) -> str:
    """Table cells: date and time in UTC without the year, so a row stays on one line."""
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%m-%d %H:%M:%S")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _decode(data: bytes | None, kind: str, *, call: bool) -> str:
    """Arguments or result as readable JSON text; the template escapes it."""
    if data is None:
        return ""
    if kind != "json":
        return f"({kind}-encoded, {len(data)} bytes: not decoded here, because decoding {kind} runs code)"
    try:
        value: Any = serializer.loads_arguments(headers.arguments(data), kind) if call else serializer.loads(data, kind)
    except Exception as exc:  # damaged data is shown, not fatal
        return f"(cannot decode: {exc})"
    if call:
        args, kwargs = value
        value = {"args": args, "kwargs": kwargs}
    return json.dumps(value, indent=2, ensure_ascii=False, default=repr)


def dismiss(backend: Persistence, record: JobRecord) -> bool:
    """Take a dead letter off the list; the record stays (finished) until the queue's result_ttl removes it.

    The protocol has no delete, and a finished record already expires; so this
    rewrites the record's own outcome without the dead flag, guarded by its token.
    """
    if not record.dead or record.state not in FINISHED_STATES:
        return False
    outcome = Outcome(record.state, result=record.result, error=record.error, dead=False, finished=record.finished)
    return backend.finish(record.id, record.token, outcome, expect=record.state)


@dataclass
class ScheduleRow:
    name: str
    spec: str
    routes: list[str]
    last: float | None
    next: float | None      # None while paused
    paused: bool


class Monitor:
    def __init__(self, queue: SkunkQueue, *, store: str, token: str | None, refresh: float = 2.0,
                 schedules: Sequence[periodic.Schedule] = (), imports: Sequence[str] = ()) -> None:
        self.queue = queue
        self.schedules = {s.name: s for s in schedules}
        self.imports = list(imports)
        self.store = store
        self.guard = Guard(token)
        self.refresh = refresh
        self.refresher = Refresher(queue, refresh)
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"),
                               autoescape=select_autoescape(["html"], default=True))
        self.env.filters.update(when=_when, short=_short, age=_age)
        # WAITING_DUE: a dependent's due until its parents release it, a date in the year 5138 if shown.
        self.env.globals.update(STATES=STATES, PAGE_SIZES=PAGE_SIZES, WAITING_DUE=dependencies.WAITING_DUE)
        # "Newest first" only where the store pages that way (Persistence.pages_newest_first).
        newest = queue.persistence.pages_newest_first
        self.default_sort = snapshot.NEWEST if newest else snapshot.STORE_ORDER
        self.sorts: list[tuple[str, str]] = ([(snapshot.NEWEST, "newest fired first")] if newest else []) + [
            (snapshot.STORE_ORDER, "the store's order")]
        self.env.globals["SORT_LABELS"] = self.sorts

    # -- rendering -------------------------------------------------------------

    def render(self, request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        fragment = request.query_params.get("fragment") == "1"
        context.update(request=request, queue=self.queue.name, store=self.store, read_only=self.guard.read_only,
                       signed_in=self.guard.session_nonce(request) is not None, csrf=self.guard.csrf_for(request),
                       refresh_ms=int(self.refresh * 1000), now=time.time(), msg=request.query_params.get("msg"),
                       path=request.url.path, fragment=fragment,
                       can_act=self.guard.session_nonce(request) is not None)
        html = self.env.get_template(template).render(**context)
        response = HTMLResponse(html, status_code=status)
        # Every page is live data, and none may be framed by another site.
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
            "frame-ancestors 'none'; form-action 'self'")
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    def _back(self, request: Request, default: str, msg: str) -> RedirectResponse:
        self.refresher.poke()  # every action changed the store: let the overview catch up now
        target = default
        form_next = request.query_params.get("next", "")
        # Only paths of this site: never an absolute or protocol-relative address.
        if form_next.startswith("/") and not form_next.startswith("//") and "\\" not in form_next:
            target = form_next
        sep = "&" if "?" in target else "?"
        return RedirectResponse(f"{target}{sep}{urlencode({'msg': msg})}", status_code=303)

    async def _guarded_form(self, request: Request) -> tuple[dict[str, Any], Response | None]:
        form = await request.form()
        values: dict[str, Any] = {key: form.getlist(key) for key in form.keys()}
        csrf = form.get("csrf")
        why = self.guard.refusal(request, csrf if isinstance(csrf, str) else None)
        if why:
            return values, self.render(request, "refused.html", status=403, reason=why)
        return values, None

    def _routes(self) -> list[str]:
        # The filter's choices come from the latest overview: counting the store again per page would cost a scan.
        return [row.route for row in self.refresher.get().rows]

    # -- pages -------------------------------------------------------------------

    def overview(self, request: Request) -> Response:
        snap = self.refresher.get()
        chart = None
        if snap.throughput is not None:
            t = snap.throughput
            chart = charts.minute_bars(t.minutes, [("completed", "ok", t.completed), ("failed", "bad", t.failed),
                                                   ("killed", "killed", t.killed)],
                                       title="Finished attempts per minute, last hour")
        return self.render(request, "overview.html", live=True, snap=snap, chart=chart, buckets=BUCKETS,
                           store_error=self.refresher.error, build=self.refresher.last_build)

    def jobs(self, request: Request) -> Response:
        q = request.query_params
        job_id = q.get("id", "").strip()
        if job_id:
            return RedirectResponse(f"/jobs/{job_id}", status_code=303)
        route, state, func = q.get("route") or None, q.get("state") or None, q.get("func") or None
        error, sort = q.get("error") or None, self._sort(q.get("sort"))
        workflow = q.get("workflow", "").strip() or None
        if state is not None and state not in STATES:
            state = None
        size = _int(q.get("size"), 50)
        size = size if size in PAGE_SIZES else 50
        page_no = max(1, _int(q.get("page"), 1))
        filters = {k: v for k, v in (("route", route), ("state", state), ("func", func), ("error", error),
                                     ("workflow", workflow), ("sort", sort), ("size", str(size))) if v}
        try:
            page = snapshot.jobs_page(self.queue, route=route, state=state, func=func, after=q.get("after") or None,
                                      size=size, error=error, sort=sort, workflow=workflow)
        except ValueError:
            return self._stale_cursor(request, "/jobs", filters)
        return self.render(request, "jobs.html", live=True, page=page, page_no=page_no, routes=self._routes(),
                           route=route, state=state, func=func, error=error, sort=sort, size=size, filters=filters,
                           workflow=workflow, urlencode=urlencode)

    def _sort(self, asked: str | None, default: str | None = None) -> str:
        """The listing order asked for, if this store offers it; else ``default`` (the newest first, where
        the store can)."""
        offered = [value for value, _ in self.sorts]
        if asked is not None and asked in offered:
            return asked
        return default if default in offered else self.default_sort

    def _stale_cursor(self, request: Request, path: str, filters: dict[str, str]) -> Response:
        # A hand-edited or foreign "after" value: one line, and the first page.
        msg = "That page address is not valid here: showing the first page."
        return RedirectResponse(f"{path}?{urlencode({**filters, 'msg': msg})}", status_code=303)

    def job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        record = self.queue.persistence.get(job_id)
        if record is None:
            return self.render(request, "missing.html", status=404, job_id=job_id)
        # A workflow member: its parents and dependents with their states, each a link (at most 100 of each).
        store = self.queue.persistence
        parents, dependents = (record.parents or [])[:100], store.dependents(job_id)[:100]
        related = dict(zip(parents + dependents, store.get_many(parents + dependents)))
        return self.render(request, "job.html", live=True, r=record, trace_id=headers.trace_id(record),
                           arguments=_decode(record.payload, record.serializer, call=True),
                           result=_decode(record.result, record.serializer, call=False),
                           waiting=dependencies.waiting(record), parents=parents, dependents=dependents,
                           related={i: (r.state if r else "expired") for i, r in related.items()})

    def dead(self, request: Request) -> Response:
        q = request.query_params
        route, func, error = q.get("route") or None, q.get("func") or None, q.get("error") or None
        # The store's order by default: a store may index its dead letters apart (Redis does), where a
        # newest-first read of every job would look through thousands to find a few.
        sort = self._sort(q.get("sort"), snapshot.STORE_ORDER)
        size = 100
        page_no = max(1, _int(q.get("page"), 1))
        filters = {k: v for k, v in (("route", route), ("func", func), ("error", error), ("sort", sort)) if v}
        try:
            page = snapshot.jobs_page(self.queue, route=route, state=ERROR, func=func, size=size, dead=True,
                                      after=q.get("after") or None, error=error, sort=sort)
        except ValueError:
            return self._stale_cursor(request, "/dead", filters)
        return self.render(request, "dead.html", live=True, page=page, page_no=page_no, routes=self._routes(),
                           route=route, func=func, error=error, sort=sort, filters=filters, urlencode=urlencode)

    def functions(self, request: Request) -> Response:
        found = snapshot.sample(self.queue)
        return self.render(request, "functions.html", live=True, found=found, rows=snapshot.functions(found),
                           urlencode=urlencode)

    def workers(self, request: Request) -> Response:
        now = time.time()
        rows = sorted(self.queue.persistence.workers(), key=lambda w: (w.route, w.host, w.pid))
        stale = {w.id: snapshot.is_stale(w, now) for w in rows}
        # The registry does not say what a worker runs; the running records name their lease holder.
        current = {r.owner: r for r in self.queue.persistence.list_jobs(state="running", limit=10_000) if r.owner}
        found = snapshot.sample(self.queue) if rows else None
        counts = snapshot.worker_counts(found) if found is not None else {}
        return self.render(request, "workers.html", live=True, workers=rows, stale=stale, taken=now, current=current,
                           found=found, counts=counts)

    def periodic_page(self, request: Request) -> Response:
        backend = self.queue.persistence
        rows = []
        if backend.supports_settings:
            now = backend.now()  # the clock the schedulers reckon slots on
            for name, schedule in sorted(self.schedules.items()):
                # periodic.py reads the state the schedulers keep; the rules are spelled only there.
                paused = periodic.is_paused(backend, name)
                rows.append(ScheduleRow(name, schedule.spec, list(schedule.job.routes),
                                        periodic.last_slot(backend, name),
                                        None if paused else schedule.next_slot(now), paused))
        return self.render(request, "periodic.html", live=True, rows=rows, imports=self.imports,
                           keeps_settings=backend.supports_settings)

    async def periodic_action(self, request: Request) -> Response:
        form, refused = await self._guarded_form(request)
        if refused:
            return refused
        name, action = (form.get("name") or [""])[0], (form.get("action") or [""])[0]
        schedule = self.schedules.get(name)
        if schedule is None or action not in ("pause", "resume", "run"):
            return self.render(request, "refused.html", status=404, reason="No such periodic job or action.")
        if action == "run":
            handle = periodic.fire_now(schedule, self.queue)
            return self._back(request, "/periodic", f"{name}: fired as {handle.id}.")
        periodic.set_paused(self.queue.persistence, name, action == "pause")
        return self._back(request, "/periodic", f"{name}: {'paused' if action == 'pause' else 'resumed'}.")

    def metrics(self, request: Request) -> Response:
        return Response(prometheus.render(self.queue, self.refresher.get()), media_type=prometheus.CONTENT_TYPE)

    def purge_confirm(self, request: Request) -> Response:
        route = request.query_params.get("route", "")
        rows = {r.route: r for r in self.queue.persistence.summary().routes}
        pending = rows[route].states["pending"] if route in rows else 0
        return self.render(request, "purge.html", route=route, pending=pending)

    # -- signing in ----------------------------------------------------------------

    def login_page(self, request: Request) -> Response:
        return self.render(request, "login.html")

    async def login(self, request: Request) -> Response:
        if self.guard.read_only:
            return self.render(request, "refused.html", status=403, reason="This monitor is read-only: there is "
                               "no token to sign in with (start skunq web with --token).")
        if not self.guard.same_origin(request):
            return self.render(request, "refused.html", status=403,
                               reason="Refused: the request came from another site.")
        form = await request.form()
        offered = form.get("token")
        if not isinstance(offered, str) or not self.guard.token_matches(offered):
            return self.render(request, "login.html", status=403, error="That is not the token.")
        response = RedirectResponse("/?msg=Signed+in", status_code=303)
        response.set_cookie(COOKIE, self.guard.new_session(), httponly=True, samesite="strict", path="/")
        return response

    async def logout(self, request: Request) -> Response:
        response = RedirectResponse("/?msg=Signed+out", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    # -- actions -------------------------------------------------------------------

    async def kill(self, request: Request) -> Response:
        _, refused = await self._guarded_form(request)
        if refused:
            return refused
        job_id = request.path_params["job_id"]
        state = self.queue.kill(job_id)
        msg = {None: f"No job {job_id}.", "killed": f"Killed {job_id}.",
               "running": f"Kill requested: {job_id} is interrupted within a second."}.get(
                   state, f"{job_id} had already ended ({state}).")
        return self._back(request, f"/jobs/{job_id}", msg)

    async def retry(self, request: Request) -> Response:
        _, refused = await self._guarded_form(request)
        if refused:
            return refused
        job_id = request.path_params["job_id"]
        ok = self.queue.retry(job_id)
        return self._back(request, f"/jobs/{job_id}", f"Requeued {job_id}." if ok else f"{job_id} is not finished.")

    async def dismiss_one(self, request: Request) -> Response:
        _, refused = await self._guarded_form(request)
        if refused:
            return refused
        job_id = request.path_params["job_id"]
        record = self.queue.persistence.get(job_id)
        ok = record is not None and dismiss(self.queue.persistence, record)
        return self._back(request, "/dead", f"Removed {job_id} from the dead letters." if ok
                          else f"{job_id} is not a dead letter.")

    async def delete_one(self, request: Request) -> Response:
        _, refused = await self._guarded_form(request)
        if refused:
            return refused
        job_id = request.path_params["job_id"]
        ok = self.queue.persistence.delete_finished([job_id]) == 1
        return self._back(request, "/dead", f"Deleted {job_id}." if ok else f"{job_id} is not finished: not deleted.")

    async def dead_bulk(self, request: Request) -> Response:
        form, refused = await self._guarded_form(request)
        if refused:
            return refused
        action = (form.get("action") or [""])[0]
        if action not in ("retry", "dismiss", "delete"):
            return self.render(request, "refused.html", status=400, reason="Unknown action.")
        backend = self.queue.persistence
        if (form.get("scope") or [""])[0] == "matching":
            route = (form.get("route") or [""])[0] or None
            func = ((form.get("func") or [""])[0] or "").lower()
            error = ((form.get("error") or [""])[0] or "").lower()
            records = [r for r in backend.list_jobs(route=route, state=ERROR, dead=True, limit=BULK_LIMIT)
                       if func in r.func.lower() and (not error or any(error in t.lower()
                                                                       for t in snapshot.error_types(r)))]
        else:
            records = [r for r in (backend.get(i) for i in form.get("ids", [])[:BULK_LIMIT]) if r is not None]
        if action == "retry":
            done = sum(1 for r in records if r.dead and self.queue.retry(r.id))
            msg = f"Requeued {done} dead letter(s)."
        elif action == "delete":
            # Only dead letters: a hand-picked id of a live or merely finished job is not this page's to delete.
            done = backend.delete_finished([r.id for r in records if r.dead and r.state == ERROR])
            msg = f"Deleted {done} dead letter(s)."
        else:
            done = sum(1 for r in records if dismiss(backend, r))
            msg = f"Removed {done} job(s) from the dead letters."
        return self._back(request, "/dead", msg)

    async def purge(self, request: Request) -> Response:
        form, refused = await self._guarded_form(request)
        if refused:
            return refused
        route = (form.get("route") or [""])[0]
        if (form.get("confirm") or [""])[0] != route or not route:
            return self._back(request, "/", "Purge not confirmed: type the route's name to confirm.")
        n = self.queue.purge(route)
        return self._back(request, "/", f"Purged {n} pending job(s) from {route}.")


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text else default
    except ValueError:
        return default


def favicon(request: Request) -> Response:
    # Browsers ask for /favicon.ico whatever the page links to; the same picture, kept a day.
    return Response((HERE / "static" / "favicon.svg").read_bytes(), media_type="image/svg+xml",
                    headers={"Cache-Control": "public, max-age=86400"})


async def _store_error(request: Request, exc: Exception) -> Response:
    # A store that is down or refuses us: one clear line, no traceback in the page.
    return PlainTextResponse(f"The store did not answer: {exc}", status_code=503)


def create_app(queue: SkunkQueue, *, store: str, token: str | None, refresh: float = 2.0,
               allowed_hosts: list[str] | None = None, schedules: Sequence[periodic.Schedule] = (),
               imports: Sequence[str] = ()) -> Starlette:
    m = Monitor(queue, store=store, token=token, refresh=refresh, schedules=schedules, imports=imports)
    routes = [
        Route("/", m.overview), Route("/jobs", m.jobs), Route("/jobs/{job_id}", m.job),
        Route("/dead", m.dead), Route("/workers", m.workers), Route("/metrics", m.metrics),
        Route("/functions", m.functions), Route("/favicon.ico", favicon),
        Route("/purge", m.purge_confirm), Route("/login", m.login_page),
        Route("/login", m.login, methods=["POST"]), Route("/logout", m.logout, methods=["POST"]),
        Route("/jobs/{job_id}/kill", m.kill, methods=["POST"]),
        Route("/jobs/{job_id}/retry", m.retry, methods=["POST"]),
        Route("/jobs/{job_id}/dismiss", m.dismiss_one, methods=["POST"]),
        Route("/jobs/{job_id}/delete", m.delete_one, methods=["POST"]),
        Route("/dead", m.dead_bulk, methods=["POST"]),
        Route("/purge", m.purge, methods=["POST"]),
        Route("/periodic", m.periodic_page),
        Route("/periodic", m.periodic_action, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    # Refuse other Host names, so a hostile page cannot reach a loopback monitor by DNS rebinding.
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["127.0.0.1", "localhost", "[::1]"])]
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={SkunkQueueError: _store_error, ConnectionError: _store_error})
    app.state.monitor = m
    return app
