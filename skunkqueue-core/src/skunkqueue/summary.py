"""What a monitor shows of a queue at a glance: per route, jobs by state, dead letters, the longest wait.

:meth:`Persistence.summary <skunkqueue.persistence.Persistence.summary>`
answers it in one call. Its default, :func:`summarize`, is built on
``counts()`` and ``list_jobs()``; on stores where those read every record (a
Redis queue's index, for one) a backend can answer from its own indexes instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol, Sequence

from skunkqueue.record import ERROR, PENDING, STATES, JobRecord

# Dead letters are counted by reading them; past this many a summary says "at least".
DEAD_COUNT_CAP = 10_000


@dataclass
class RouteSummary:
    route: str
    states: dict[str, int]          # every state in record.STATES, zeros included
    dead: int                       # records in the dead-letter list
    oldest_due: float | None        # ``due`` of the longest-waiting pending record that is due; None: none is


@dataclass
class QueueSummary:
    routes: list[RouteSummary]      # sorted by route name
    dead_capped: bool = False       # True: some route has at least DEAD_COUNT_CAP dead letters in all


class Readable(Protocol):
    """What :func:`summarize` reads of a store: a :class:`~skunkqueue.persistence.Persistence` has it.

    Named here rather than imported, since the Persistence protocol itself uses summarize.
    """

    def counts(self) -> dict[tuple[str, str], int]: ...

    def list_jobs(self, *, route: str | None = None, state: str | None = None,
                  dead: bool | None = None, limit: int = 1000) -> Sequence[JobRecord]: ...


def summarize(backend: Readable, now: float | None = None) -> QueueSummary:
    """The default :meth:`Persistence.summary`: one ``counts()``, one dead-letter listing, one listing per route."""
    now = time.time() if now is None else now
    counts = backend.counts()
    dead_records = backend.list_jobs(state=ERROR, dead=True, limit=DEAD_COUNT_CAP)
    dead: dict[str, int] = {}
    for record in dead_records:
        dead[record.route] = dead.get(record.route, 0) + 1
    routes = []
    for route in sorted({route for route, _ in counts} | set(dead)):
        states = {state: counts.get((route, state), 0) for state in STATES}
        oldest = None
        if states[PENDING]:
            # list_jobs orders by due: the first pending record is the one waiting longest.
            first = backend.list_jobs(route=route, state=PENDING, limit=1)
            if first and first[0].due <= now:
                oldest = first[0].due
        routes.append(RouteSummary(route, states, dead.get(route, 0), oldest))
    return QueueSummary(routes, dead_capped=len(dead_records) >= DEAD_COUNT_CAP)
