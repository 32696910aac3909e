"""A periodic job for the kit's clock-skew test: every 2 s (runs counted by ``periodic_runs``)."""

from __future__ import annotations

from datetime import timedelta

from skunkqueue.testing.kit import kit_queue, kit_routes
from skunkqueue.testing.periodic_runs import note_run

_kit = kit_queue("skunkqueue-testing-periodic")


@_kit.periodic(every=timedelta(seconds=2), routes=kit_routes(["r"]), misfire_grace=5)
def every_two_seconds() -> float:
    return note_run()
