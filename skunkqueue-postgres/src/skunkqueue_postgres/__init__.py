"""PostgreSQL backend for SkunkQueue: ``SkunkQueue("q", backend="postgres", conn_url="postgresql://...")``."""

from __future__ import annotations

from typing import Any

# The same configuration shape as the other backends' ``default_cfg``; ``dbname`` is the schema.
default_cfg: dict[str, Any] = {"backend": "postgres", "conn_url": "postgresql://localhost/postgres",
                               "dbname": "skunkqueue"}


def __getattr__(name: str) -> Any:
    # Importing the backend pulls in psycopg; keep ``default_cfg`` import-cheap.
    if name == "PostgresPersistence":
        from skunkqueue_postgres.persistence import PostgresPersistence

        return PostgresPersistence
    raise AttributeError(name)


__all__ = ["PostgresPersistence", "default_cfg"]
