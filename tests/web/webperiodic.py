"""Periodic jobs for the monitor's schedules view; every run appends a line to $WEBTEST_RUNS, outside the queue."""

from __future__ import annotations

from webjobs import _ran, queue


# Slots far from now (an hour apart, or 03:00 UTC), so no pool fires one during a test by itself.
@queue.periodic(routes=["fast"], every=3600)
def hourly() -> None:
    _ran("hourly")


@queue.periodic(routes=["<i>fast</i>"], cron="0 3 * * *")
def nightly() -> None:
    _ran("nightly")
