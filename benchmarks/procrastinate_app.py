"""Procrastinate with the same no-op task, for the PostgreSQL comparison.

``procrastinate --app benchmarks.procrastinate_app.app worker`` builds its app from SKUNQ_BENCH_PG (a
PostgreSQL URL); the benchmark builds its own with :func:`make_procrastinate`. The task is a
coroutine: Procrastinate's worker runs an ``async def`` task on its event loop and a plain ``def``
one in a thread (``sync_to_async``), so the coroutine is its fastest way to run a no-op.
"""

from __future__ import annotations

import os
from typing import Any

QUEUE = "skunqbench"


async def noop(i: Any) -> Any:
    return i


def make_procrastinate(url: str) -> tuple[Any, Any]:
    """(Procrastinate app, noop task) on a PsycopgConnector, Procrastinate's connector for psycopg 3."""
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
    return app, app.task(name="noop", queue=QUEUE)(noop)


app: Any = None
if os.environ.get("SKUNQ_BENCH_PG"):
    app, _task = make_procrastinate(os.environ["SKUNQ_BENCH_PG"])
