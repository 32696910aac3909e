"""A periodic job for the kit, declared on a queue that keeps finished records 3 s (``result_ttl=3``).

The pool fires it through its own connection; the records must still carry
the declaring queue's options.
"""

from __future__ import annotations

from datetime import timedelta

from skunkqueue.testing.kit import kit_queue, kit_routes
from skunkqueue.testing.periodic_runs import note_run

RESULT_TTL = 3.0

_kit = kit_queue("skunkqueue-testing-periodic", result_ttl=RESULT_TTL)


@_kit.periodic(every=timedelta(seconds=1), routes=kit_routes(["r"]), misfire_grace=5)
def short_lived() -> float:
    return note_run()
