"""Periodic jobs for the kit whose intervals are not whole seconds (1.1 s and 1.3 s).

Slots reached by different chains of float arithmetic once differed in the
last digits, and one slot fired twice under two keys. The default
misfire_grace (60 s) makes a pool's first check walk the longest chain.
"""

from __future__ import annotations

from datetime import timedelta

from skunkqueue.testing.kit import kit_queue, kit_routes
from skunkqueue.testing.periodic_runs import note_run

_kit = kit_queue("skunkqueue-testing-periodic")


@_kit.periodic(every=timedelta(seconds=1.1), routes=kit_routes(["r"]))
def eleven_tenths() -> float:
    return note_run()


@_kit.periodic(every=1.3, routes=kit_routes(["r"]))
def thirteen_tenths() -> float:
    return note_run()
