"""Dramatiq with the same no-op actor, for the comparison (RedisBroker, Results on a RedisBackend).

``dramatiq benchmarks.dramatiq_app`` declares its broker and actor from SKUNQ_BENCH_REDIS (a
redis URL); the benchmark builds its own with :func:`make_dramatiq`.
"""

from __future__ import annotations

import os
from typing import Any

QUEUE = "skunqbench"


def noop(i: Any) -> Any:
    return i


def make_dramatiq(url: str) -> tuple[Any, Any, Any]:
    """(broker, result backend, noop actor storing its results), the broker set as Dramatiq's global one."""
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.results import Results
    from dramatiq.results.backends import RedisBackend

    broker = RedisBroker(url=url)
    backend = RedisBackend(url=url)
    broker.add_middleware(Results(backend=backend))
    dramatiq.set_broker(broker)
    actor = dramatiq.actor(actor_name="noop", queue_name=QUEUE, store_results=True, broker=broker)(noop)
    return broker, backend, actor


broker: Any = None
if os.environ.get("SKUNQ_BENCH_REDIS"):
    broker, _backend, _actor = make_dramatiq(os.environ["SKUNQ_BENCH_REDIS"])
