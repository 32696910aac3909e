"""SkunkQueue's FoundationDB backend (entry point ``fdb``).

Importing this package does not import the ``fdb`` bindings: the backend
class lives in :mod:`skunkqueue_fdb.persistence`.
"""

from __future__ import annotations

from typing import Any

# conn_url: path of the cluster file (None: the client's default cluster file).
# dbname: the root under which every queue's keys live.
default_cfg: dict[str, Any] = {"backend": "fdb", "conn_url": None, "dbname": "skunkqueue"}

__all__ = ["default_cfg"]
