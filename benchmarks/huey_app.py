"""Huey with the same no-op task, for the comparison.

``huey_consumer benchmarks.huey_app.huey`` builds its instance from
SKUNQ_BENCH_HUEY (``redis`` or ``sqlite``), SKUNQ_BENCH_HUEY_WHERE (a redis
URL or an SQLite file) and SKUNQ_BENCH_HUEY_NOTIFY (``1``: RedisHuey with
``notify_result=True``); the benchmark builds its own with :func:`make_huey`.
"""

from __future__ import annotations

import os
from typing import Any


def noop(i: Any) -> Any:
    return i


def make_huey(kind: str, where: str, notify_result: bool = False) -> tuple[Any, Any]:
    """(huey instance, noop task) for RedisHuey or SqliteHuey.

    ``notify_result`` (Redis only) makes the consumer push a notice per result so that a blocking
    ``get`` pops it instead of polling: Huey's fastest set-up for latency, and a second write per
    task that slows its throughput, so the benchmark turns it on for the latency figure only.
    """
    from huey import RedisHuey, SqliteHuey

    if kind == "redis":
        huey = RedisHuey("skunqbench", url=where, notify_result=notify_result)
    elif kind == "sqlite":
        huey = SqliteHuey("skunqbench", filename=where)
    else:
        raise ValueError(f"unknown huey storage {kind!r}")
    return huey, huey.task(name="noop")(noop)


huey: Any = None
if os.environ.get("SKUNQ_BENCH_HUEY"):
    huey, _task = make_huey(os.environ["SKUNQ_BENCH_HUEY"], os.environ["SKUNQ_BENCH_HUEY_WHERE"],
                            os.environ.get("SKUNQ_BENCH_HUEY_NOTIFY") == "1")
