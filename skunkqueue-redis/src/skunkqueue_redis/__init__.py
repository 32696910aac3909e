"""Redis backend for SkunkQueue: ``SkunkQueue("q", backend="redis", conn_url=..., dbname=...)``."""

from __future__ import annotations

from typing import Any

# The seed's configuration shape; ``skunkqueue.persistence.redis`` re-exports it.
default_cfg: dict[str, Any] = {"backend": "redis", "conn_url": "localhost:6379", "dbname": "0"}


def __getattr__(name: str) -> Any:
    # Importing the backend pulls in redis-py; keep ``default_cfg`` import-cheap.
    if name == "RedisPersistence":
        from skunkqueue_redis.persistence import RedisPersistence

        return RedisPersistence
    raise AttributeError(name)


__all__ = ["RedisPersistence", "default_cfg"]
