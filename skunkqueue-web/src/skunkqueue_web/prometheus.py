"""``GET /metrics``: the overview in Prometheus's text format.

Totals and the duration histogram come from the workers' per-minute counters,
summed over the window the store keeps (``metrics.RETENTION``). They are the
counts of that window, so they may fall as old minutes drop out; Prometheus's
``rate()`` treats a fall as a counter reset, which is what it is.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from skunkqueue.metrics import BUCKETS, RETENTION, bucket_name
from skunkqueue.queue import SkunkQueue
from skunkqueue_web.snapshot import Overview, is_stale

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class QueueCollector(Collector):
    def __init__(self, queue: SkunkQueue, snap: Overview) -> None:
        self.queue = queue
        self.snap = snap

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        snap = self.snap
        name = self.queue.name
        jobs = GaugeMetricFamily("skunkqueue_jobs", "Jobs in the store by route and state.",
                                 labels=["queue", "route", "state"])
        dead = GaugeMetricFamily("skunkqueue_dead_letters", "Jobs in the dead-letter list.",
                                 labels=["queue", "route"])
        oldest = GaugeMetricFamily("skunkqueue_oldest_pending_age_seconds",
                                   "How long the longest-waiting due job has waited.", labels=["queue", "route"])
        for row in snap.rows:
            for state, n in row.states.items():
                jobs.add_metric([name, row.route, state], n)
            dead.add_metric([name, row.route], row.dead)
            oldest.add_metric([name, row.route], row.oldest_pending_age or 0.0)
        yield jobs
        yield dead
        yield oldest
        if snap.flows:
            paused = GaugeMetricFamily("skunkqueue_route_paused", "1 while the route is paused (skunq pause).",
                                       labels=["queue", "route"])
            waiting = GaugeMetricFamily("skunkqueue_jobs_waiting_on_limit",
                                        "Due jobs that a pause or a limit holds back.", labels=["queue", "route"])
            concurrency = GaugeMetricFamily("skunkqueue_route_limit_concurrency",
                                            "The route's own concurrency limit (queue.limit).",
                                            labels=["queue", "route"])
            rate = GaugeMetricFamily("skunkqueue_route_limit_rate_per_second",
                                     "The route's own rate limit (queue.limit), starts per second.",
                                     labels=["queue", "route"])
            for route, shown in sorted(snap.flows.items()):
                paused.add_metric([name, route], 1 if shown.paused else 0)
                waiting.add_metric([name, route], shown.waiting)
                if shown.limit is not None and shown.limit.concurrency is not None:
                    concurrency.add_metric([name, route], shown.limit.concurrency)
                if shown.limit is not None and shown.limit.rate is not None:
                    rate.add_metric([name, route], shown.limit.rate.count / shown.limit.rate.period)
            yield paused
            yield waiting
            yield concurrency
            yield rate
        alive = GaugeMetricFamily("skunkqueue_workers", "Registered workers by route and liveness.",
                                  labels=["queue", "route", "alive"])
        by_route: dict[tuple[str, str], int] = {}
        for w in snap.workers:
            key = (w.route, "false" if is_stale(w, snap.taken) else "true")
            by_route[key] = by_route.get(key, 0) + 1
        for (route, live), n in sorted(by_route.items()):
            alive.add_metric([name, route, live], n)
        yield alive
        keeps = GaugeMetricFamily("skunkqueue_stats_kept",
                                  "1 when the backend keeps the workers' throughput counters.", labels=["queue"])
        keeps.add_metric([name], 1 if self.queue.persistence.keeps_stats else 0)
        yield keeps
        if not self.queue.persistence.keeps_stats:
            return
        # The one-hour overview window is not enough for totals: read everything the store keeps.
        stats = self.queue.persistence.stats(int((snap.taken - RETENTION) // 60))
        finished = CounterMetricFamily("skunkqueue_attempts", "Finished attempts by outcome (counters window).",
                                       labels=["queue", "route", "outcome"])
        sums: dict[tuple[str, str], int] = {}
        hist: dict[str, list[int]] = {}
        dur: dict[str, int] = {}
        for sample in stats:
            for outcome in ("completed", "failed", "killed"):
                sums[(sample.route, outcome)] = sums.get((sample.route, outcome), 0) + sample.counts.get(outcome, 0)
            h = hist.setdefault(sample.route, [0] * (len(BUCKETS) + 1))
            for i in range(len(BUCKETS) + 1):
                h[i] += sample.counts.get(bucket_name(i), 0)
            dur[sample.route] = dur.get(sample.route, 0) + sample.counts.get("duration_us", 0)
        for (route, outcome), n in sorted(sums.items()):
            finished.add_metric([name, route, outcome], n)
        yield finished
        duration = HistogramMetricFamily("skunkqueue_job_duration_seconds",
                                         "Run time of completed and failed attempts.", labels=["queue", "route"])
        for route, h in sorted(hist.items()):
            running, cumulative = 0, []
            for bound, n in zip([*map(str, BUCKETS), "+Inf"], h):
                running += n
                cumulative.append((bound, running))
            duration.add_metric([name, route], cumulative, sum_value=dur.get(route, 0) / 1e6)
        yield duration


def render(queue: SkunkQueue, snap: Overview) -> bytes:
    """The metrics of ``snap`` (the refresher's latest overview) and of the store's counters."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueCollector(queue, snap))
    return generate_latest(registry)
