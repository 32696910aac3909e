"""What the monitor shows, read from any backend through the Persistence protocol only.

Nothing here knows which store it talks to: counts, dead letters and the
longest wait come from ``summary()``, throughput from the workers'
per-minute counters (``stats``) when the backend keeps them.
"""

from __future__ import annotations

import math
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


# The listings' orders: the newest fired first (where the store can, Persistence.pages_newest_first),
# or the store's own paging order.
NEWEST, STORE_ORDER = "newest", "store"
SORTS = (NEWEST, STORE_ORDER)


def error_types(record: JobRecord) -> list[str]:
    """The error types a record names: its last error's, and each attempt's in its history."""
    found = [e["error_type"] for e in record.history if e.get("error_type")]
    if record.error and record.error.get("type"):
        found.append(record.error["type"])
    return found


def _matches(record: JobRecord, func: str | None, error: str | None, workflow: str | None = None) -> bool:
    """``func``, ``error``: lower-case parts of the function's name and of one of its error types;
    ``workflow``: the exact id of the workflow the record belongs to."""
    if workflow is not None and record.workflow != workflow:
        return False
    if func is not None and func not in record.func.lower():
        return False
    return error is None or any(error in name.lower() for name in error_types(record))


def jobs_page(queue: SkunkQueue, *, route: str | None, state: str | None, func: str | None,
              after: str | None, size: int, dead: bool | None = None, error: str | None = None,
              sort: str = NEWEST, workflow: str | None = None) -> Page:
    """One page of records, newest fired first (``sort``; where the store cannot, or with ``store``: in its
    paging order, Persistence.list_page); ``func`` matches any part of the function's name, ``error``
    any part of an error type the record names (its last error's or an attempt's), case-insensitively;
    ``workflow`` keeps the members of one workflow (the stores index no workflow ids: it is a scan
    like the others, and the members of a workflow were fired together, so they sit side by side).

    Reads the store's pages until this one is full or the scan budget is spent (then ``partial``).
    Raises ValueError for a cursor the store did not make.
    """
    backend = queue.persistence
    needle = func.lower() if func else None
    wanted_error = error.lower() if error else None
    newest = sort == NEWEST and backend.pages_newest_first
    started = time.monotonic()
    found: list[JobRecord] = []
    looked = 0
    cursor = after
    while True:
        # Ask each time only for as many records as are still missing, so the page ends exactly
        # where a cursor can resume (a store may also return fewer, with a cursor, when few match).
        # ``newest`` only when asked for: a backend of an older protocol takes no such argument.
        batch, cursor = (backend.list_page(route=route, state=state, dead=dead, limit=size - len(found),
                                           after=cursor, newest=True) if newest else
                         backend.list_page(route=route, state=state, dead=dead, limit=size - len(found),
                                           after=cursor))
        looked += len(batch)
        found += [r for r in batch if _matches(r, needle, wanted_error, workflow)]
        if len(found) >= size or cursor is None:
            return Page(found, size, cursor, looked)
        if time.monotonic() - started >= SCAN_SECONDS or looked >= SCAN_RECORDS:
            return Page(found, size, cursor, looked, partial=True)


# -- what the last jobs say: per function and per worker (read within the scan budget) ----------------


@dataclass
class Sample:
    """The newest records the store gave within the scan budget (all of them when ``partial`` is False)."""

    records: list[JobRecord]
    partial: bool           # the budget ran out: older records were not read
    took: float             # seconds spent reading
    newest_first: bool      # False: a store without newest-first pages gave its own order


def sample(queue: SkunkQueue) -> Sample:
    """Up to SCAN_RECORDS records, newest fired first where the store can, read for at most SCAN_SECONDS."""
    backend = queue.persistence
    newest = backend.pages_newest_first
    started = time.monotonic()
    records: list[JobRecord] = []
    cursor: str | None = None
    while True:
        want = min(1000, SCAN_RECORDS - len(records))
        batch, cursor = (backend.list_page(limit=want, after=cursor, newest=True) if newest else
                         backend.list_page(limit=want, after=cursor))
        records += batch
        if cursor is None:
            return Sample(records, False, time.monotonic() - started, newest)
        if len(records) >= SCAN_RECORDS or time.monotonic() - started >= SCAN_SECONDS:
            return Sample(records, True, time.monotonic() - started, newest)


FAILED_ATTEMPTS = ("error", "lost")


def run_time(entry: dict[str, object]) -> float | None:
    """Seconds an attempt ran, from its history entry (None when a stamp is missing)."""
    started, finished = entry.get("started"), entry.get("finished")
    if isinstance(started, (int, float)) and isinstance(finished, (int, float)) and finished >= started:
        return float(finished - started)
    return None


def percentile(values: list[float], share: float) -> float | None:
    """The nearest-rank percentile (``share`` from 0 to 1) of ``values``; None for none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1))]


@dataclass
class FunctionRow:
    func: str
    states: dict[str, int]          # jobs per state
    attempts: int = 0               # ended attempts the histories hold
    failed: int = 0                 # of which ended error or lost
    times: list[float] = field(default_factory=list)  # run times of the ended attempts, seconds

    @property
    def jobs(self) -> int:
        return sum(self.states.values())

    @property
    def failure_rate(self) -> float | None:
        return self.failed / self.attempts if self.attempts else None

    @property
    def mean(self) -> float | None:
        return sum(self.times) / len(self.times) if self.times else None

    @property
    def p95(self) -> float | None:
        return percentile(self.times, 0.95)


def functions(found: Sample) -> list[FunctionRow]:
    """Per function: jobs per state, ended attempts, failed attempts, run times (from the histories)."""
    rows: dict[str, FunctionRow] = {}
    for record in found.records:
        row = rows.get(record.func)
        if row is None:
            row = rows[record.func] = FunctionRow(record.func, dict.fromkeys(STATES, 0))
        row.states[record.state] = row.states.get(record.state, 0) + 1
        for entry in record.history:
            row.attempts += 1
            row.failed += entry.get("outcome") in FAILED_ATTEMPTS
            ran = run_time(entry)
            if ran is not None:
                row.times.append(ran)
    return sorted(rows.values(), key=lambda r: (-r.jobs, r.func))


@dataclass
class WorkerCounts:
    processed: int = 0      # attempts it ended
    failed: int = 0         # of which ended error or lost


def worker_counts(found: Sample) -> dict[str, WorkerCounts]:
    """Per worker id: the attempts the sampled records' histories say it ended, and how many failed."""
    counts: dict[str, WorkerCounts] = {}
    for record in found.records:
        for entry in record.history:
            worker = entry.get("worker")
            if isinstance(worker, str):
                seen = counts.setdefault(worker, WorkerCounts())
                seen.processed += 1
                seen.failed += entry.get("outcome") in FAILED_ATTEMPTS
    return counts
