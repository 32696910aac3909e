"""A periodic job for the kit: pools that import this module (``--import``) fire it every second.

Each run appends a line to the file named by ``$SKUNQ_KIT_TICKS``, outside the
queue (see :mod:`skunkqueue.testing.periodic_runs`), so the kit counts runs per
slot on its own. The other ``periodic_*`` modules declare the schedules of the
kit's other periodic tests.
"""

from __future__ import annotations

from datetime import timedelta

from skunkqueue.testing.kit import kit_queue, kit_routes
from skunkqueue.testing.periodic_runs import note_run

_kit = kit_queue("skunkqueue-testing-periodic")


@_kit.periodic(every=timedelta(seconds=1), routes=kit_routes(["r"]), misfire_grace=5)
def tick() -> float:
    return note_run()
