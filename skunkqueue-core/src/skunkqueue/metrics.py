"""Throughput counters: what the workers did, per route and per minute.

Pools count the attempts their workers finish (they hear of each one through
the worker's pipe) and add the counts to the store once per heartbeat, so the
counters cost no round trip per job and outlive the records, which expire.
The monitor (``skunq web``) and its Prometheus endpoint read them back with
:meth:`~skunkqueue.persistence.Persistence.stats`.

Every counter is an integer, so every store can add them atomically:

``completed``, ``failed``, ``killed``
    attempts that ended so (``failed`` counts every failed attempt, also
    those that will be retried)
``duration_us``
    the summed run time of completed and failed attempts, in microseconds
``b0`` … ``bN``
    how many of those attempts took at most ``BUCKETS[i]`` seconds and more
    than the bucket before (``bN``, the last: more than the largest bound)
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from dataclasses import dataclass, field

# Upper bounds (seconds) of the duration histogram's buckets, as Prometheus's defaults plus minutes.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Stores keep counters this long (seconds): an hour on the charts, and slack.
RETENTION = 2 * 3600

COUNTED = ("completed", "failed", "killed")


def bucket_name(index: int) -> str:
    return f"b{index}"


@dataclass
class RouteMinute:
    """Counters of one route for one minute (``minute`` = epoch seconds // 60)."""

    route: str
    minute: int
    counts: dict[str, int] = field(default_factory=dict)


class Tally:
    """The counts a pool gathers between two flushes to the store."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, route: str, state: str, seconds: float, now: float | None = None) -> None:
        """One finished attempt: ``state`` is its outcome (complete, error, killed, or pending for a retry)."""
        name = {"complete": "completed", "error": "failed", "pending": "failed", "killed": "killed"}.get(state)
        if name is None:
            return
        counts = self._counts[(route, int((time.time() if now is None else now) // 60))]
        counts[name] += 1
        if name != "killed":
            counts["duration_us"] += int(seconds * 1_000_000)
            counts[bucket_name(bisect.bisect_left(BUCKETS, seconds))] += 1

    def drain(self) -> list[RouteMinute]:
        """What was counted since the last drain; the tally starts again from zero."""
        taken, self._counts = self._counts, defaultdict(lambda: defaultdict(int))
        return [RouteMinute(route, minute, dict(counts)) for (route, minute), counts in taken.items()]

    def __bool__(self) -> bool:
        return bool(self._counts)
