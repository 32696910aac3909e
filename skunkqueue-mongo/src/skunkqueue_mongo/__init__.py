"""MongoDB backend for SkunkQueue: ``SkunkQueue("q", backend="mongodb", conn_url=..., dbname=...)``."""

from __future__ import annotations

from typing import Any

# The seed's configuration shape; ``skunkqueue.persistence.mongodb`` re-exports it.
default_cfg: dict[str, Any] = {"backend": "mongodb", "conn_url": "localhost:27017", "dbname": "skunkqueue"}


def __getattr__(name: str) -> Any:
    # Importing the backend pulls in pymongo; keep ``default_cfg`` import-cheap.
    if name == "MongoPersistence":
        from skunkqueue_mongo.persistence import MongoPersistence

        return MongoPersistence
    raise AttributeError(name)


__all__ = ["MongoPersistence", "default_cfg"]
