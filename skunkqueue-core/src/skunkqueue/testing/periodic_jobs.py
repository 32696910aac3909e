"""A periodic job for the kit: pools that import this module (``--import``) fire it every second.

Each run appends ``slot started-at pid`` to the file named by ``$SKUNQ_KIT_TICKS``,
outside the queue, so the kit counts runs per slot on its own.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

from skunkqueue.context import current_job
from skunkqueue.testing.kit import append_line, kit_queue, kit_routes

_kit = kit_queue("skunkqueue-testing-periodic")


@_kit.periodic(every=timedelta(seconds=1), routes=kit_routes(["r"]), misfire_grace=5)
def tick() -> float:
    started = time.time()
    ctx = current_job()
    slot = ctx.slot.timestamp() if ctx is not None and ctx.slot is not None else None
    append_line(os.environ["SKUNQ_KIT_TICKS"], f"{slot!r} {started!r} {os.getpid()}")
    return started
