"""The seed's import path: ``from skunkqueue.persistence.mongodb import default_cfg``.

The backend itself ships in the ``skunkqueue-mongo`` distribution.
"""

from __future__ import annotations

try:
    from skunkqueue_mongo import default_cfg
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "The mongodb backend is not installed: pip install skunkqueue-mongo"
    ) from exc

__all__ = ["default_cfg"]
