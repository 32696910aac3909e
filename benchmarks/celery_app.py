"""Celery with the same no-op task, for the comparison (Redis broker, Redis result backend).

``celery -A benchmarks.celery_app worker`` builds its app from SKUNQ_BENCH_REDIS (a redis URL);
the benchmark builds its own with :func:`make_celery`.
"""

from __future__ import annotations

import os
from typing import Any

QUEUE = "skunqbench"


def noop(i: Any) -> Any:
    return i


def make_celery(url: str) -> tuple[Any, Any]:
    """(Celery app, noop task); results in the same redis, which waiters wait on by pub/sub."""
    from celery import Celery

    app = Celery("skunqbench", broker=url, backend=url)
    app.conf.task_default_queue = QUEUE
    return app, app.task(name="noop")(noop)


app: Any = None
if os.environ.get("SKUNQ_BENCH_REDIS"):
    app, _task = make_celery(os.environ["SKUNQ_BENCH_REDIS"])
