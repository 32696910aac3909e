"""What the monitor shows, read from any backend through the Persistence protocol only.

Nothing here knows which store it talks to: counts, dead letters and the
longest wait come from ``summary()``, throughput from the workers'
per-minute counters (``stats``) when the backend keeps them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from skunkqueue import flow
from skunkqueue.housekeeping import WORKER_TTL
from skunkqueue.metrics import BUCKETS, COUNTED, RouteMinute, bucket_name
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import STATES, JobRecord, WorkerInfo

# Throughput charts cover this many minutes, the current one last.
CHART_MINUTES = 60


@dataclass
class RouteRow:
    route: str
    states: dict[str, int]
    dead: int
    oldest_pending_age: float | None  # seconds a due job has waited; None: nothing due


@dataclass
class Throughput:
    """Per-minute counters summed over routes, oldest first; None when the backend keeps none."""

    minutes: list[int]
    completed: list[int]
    failed: list[int]
    killed: list[int]
    per_route: dict[str, dict[str, int]]       # route -> counter -> sum over the window
    buckets: dict[str, list[int]]              # route -> histogram bucket counts over the window
    duration_us: dict[str, int]                # route -> summed run time over the window


@dataclass
class Overview:
    taken: float
    rows: list[RouteRow]
    dead_capped: bool
    workers: list[WorkerInfo]
    throughput: Throughput | None
    totals: dict[str, int] = field(default_factory=dict)
    # Per route: paused, its own limit, and the due jobs a pause or a limit holds back (flow control);
    # empty on a store that keeps no settings.
    flows: dict[str, flow.RouteFlow] = field(default_factory=dict)

    @property
    def dead(self) -> int:
        return sum(r.dead for r in self.rows)

    @property
    def workers_alive(self) -> int:
        return sum(1 for w in self.workers if not is_stale(w, self.taken))


def is_stale(worker: WorkerInfo, now: float) -> bool:
    """A worker whose heartbeat is older than the registry's reaping age is probably gone."""
    return now - worker.last_seen > WORKER_TTL


def overview(queue: SkunkQueue, *, now: float | None = None) -> Overview:
    backend = queue.persistence
    now = time.time() if now is None else now
    summary = backend.summary(now)
    rows = [RouteRow(r.route, r.states, r.dead, None if r.oldest_due is None else now - r.oldest_due)
            for r in summary.routes]
    totals = {state: sum(r.states[state] for r in rows) for state in STATES}
    workers = sorted(backend.workers(), key=lambda w: (w.route, w.host, w.pid))
    flows: dict[str, flow.RouteFlow] = {}
    if backend.supports_settings:
        routes = sorted({r.route for r in rows} | {w.route for w in workers})
        flows = flow.describe(backend, routes)
    return Overview(taken=now, rows=rows, dead_capped=summary.dead_capped, workers=workers,
                    throughput=throughput(queue, now), totals=totals, flows=flows)


def throughput(queue: SkunkQueue, now: float) -> Throughput | None:
    backend = queue.persistence
    if not backend.keeps_stats:
        return None
    last = int(now // 60)
    first = last - CHART_MINUTES + 1
    minutes = list(range(first, last + 1))
    series = {name: [0] * CHART_MINUTES for name in COUNTED}
    per_route: dict[str, dict[str, int]] = {}
    buckets: dict[str, list[int]] = {}
    duration: dict[str, int] = {}
    sample: RouteMinute
    for sample in backend.stats(first):
        if not first <= sample.minute <= last:
            continue
        for name in COUNTED:
            series[name][sample.minute - first] += sample.counts.get(name, 0)
        route_sums = per_route.setdefault(sample.route, dict.fromkeys(COUNTED, 0))
        for name in COUNTED:
            route_sums[name] += sample.counts.get(name, 0)
        hist = buckets.setdefault(sample.route, [0] * (len(BUCKETS) + 1))
        for i in range(len(BUCKETS) + 1):
            hist[i] += sample.counts.get(bucket_name(i), 0)
        duration[sample.route] = duration.get(sample.route, 0) + sample.counts.get("duration_us", 0)
    return Throughput(minutes, series["completed"], series["failed"], series["killed"], per_route, buckets,
                      duration)


@dataclass
class Page:
    records: list[JobRecord]
    size: int
    next: str | None        # the cursor of the next page; None: this is the last
    looked: int = 0         # records read from the store for this page (before the function filter)
    partial: bool = False   # the scan budget ran out before the page was full: ``next`` continues the search


# Every page request stops reading the store once it has taken this long, or read this many
# records, whatever the store holds: a filter that matches nothing among 100,000 jobs answers with
# what it found so far and a cursor that continues the search, instead of reading them all.
SCAN_SECONDS = 0.5
SCAN_RECORDS = 5_000


def jobs_page(queue: SkunkQueue, *, route: str | None, state: str | None, func: str | None,
              after: str | None, size: int, dead: bool | None = None) -> Page:
    """One page of records, in the store's paging order (Persistence.list_page); ``func`` matches any part
    of the function's name, case-insensitively.

    Reads the store's pages until this one is full or the scan budget is spent (then ``partial``).
    Raises ValueError for a cursor the store did not make.
    """
    backend = queue.persistence
    needle = func.lower() if func else None
    started = time.monotonic()
    found: list[JobRecord] = []
    looked = 0
    cursor = after
    while True:
        # Ask each time only for as many records as are still missing, so the page ends exactly
        # where a cursor can resume (a store may also return fewer, with a cursor, when few match).
        batch, cursor = backend.list_page(route=route, state=state, dead=dead, limit=size - len(found),
                                          after=cursor)
        looked += len(batch)
        found += [r for r in batch if needle is None or needle in r.func.lower()]
        if len(found) >= size or cursor is None:
            return Page(found, size, cursor, looked)
        if time.monotonic() - started >= SCAN_SECONDS or looked >= SCAN_RECORDS:
            return Page(found, size, cursor, looked, partial=True)
