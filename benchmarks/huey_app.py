"""Huey with the same no-op task, for the comparison.

``huey_consumer benchmarks.huey_app.huey`` builds its instance from
SKUNQ_BENCH_HUEY (``redis`` or ``sqlite``) and SKUNQ_BENCH_HUEY_WHERE (a redis
URL or an SQLite file); the benchmark builds its own with :func:`make_huey`.
"""

from __future__ import annotations

import os
from typing import Any


def noop(i: Any) -> Any:
    return i


def make_huey(kind: str, where: str) -> tuple[Any, Any]:
    """(huey instance, noop task) for RedisHuey or SqliteHuey."""
    from huey import RedisHuey, SqliteHuey

    if kind == "redis":
        # notify_result: result waiters block on a list instead of polling (Huey's fastest set-up).
        huey = RedisHuey("skunqbench", url=where, notify_result=True)
    elif kind == "sqlite":
        huey = SqliteHuey("skunqbench", filename=where)
    else:
        raise ValueError(f"unknown huey storage {kind!r}")
    return huey, huey.task(name="noop")(noop)


huey: Any = None
if os.environ.get("SKUNQ_BENCH_HUEY"):
    huey, _task = make_huey(os.environ["SKUNQ_BENCH_HUEY"], os.environ["SKUNQ_BENCH_HUEY_WHERE"])
