"""A producer process for the kit: ``python -m skunkqueue.testing.firing SPEC``.

SPEC is JSON: ``{"backend": ..., "url": ..., "db": ..., "options": {...}, "queue": ...,
"key": ..., "times": N, "start_at": EPOCH, "api": "sync" or "async"}``. The process waits
until ``start_at`` (so that several line up), fires ``jobs.add`` on route ``r`` with
the key ``times`` times (all at once with ``afire`` for ``async``), and prints each
handle's id on its own line.
"""

from __future__ import annotations

import json
import sys
import time

from skunkqueue.queue import SkunkQueue
from skunkqueue.testing import jobs


def main() -> None:
    spec = json.loads(sys.argv[1])
    queue = SkunkQueue(spec["queue"], backend=spec["backend"], conn_url=spec["url"], dbname=spec["db"],
                       **spec["options"])
    add = queue.event(routes=["r"])(jobs.add.func)
    if spec.get("api", "sync") == "async":
        import asyncio

        async def fire_all() -> list[str]:
            await queue.apersistence.aget("warm-up")  # connect (this loop's client) before the start line
            await asyncio.sleep(max(0.0, spec["start_at"] - time.time()))
            handles = await asyncio.gather(*(add.afire(1, 2, key=spec["key"]) for _ in range(spec["times"])))
            return [h.id for h in handles]

        ids = asyncio.run(fire_all())
    else:
        queue.persistence  # connect before the start line  # noqa: B018
        time.sleep(max(0.0, spec["start_at"] - time.time()))
        ids = [add.fire(1, 2, key=spec["key"]).id for _ in range(spec["times"])]
    for job_id in ids:
        print(job_id, flush=True)
    queue.close()


if __name__ == "__main__":
    main()
