"""The seed's import path: ``from skunkqueue.persistence.redis import default_cfg``.

The backend itself ships in the ``skunkqueue-redis`` distribution.
"""

from __future__ import annotations

try:
    from skunkqueue_redis import default_cfg
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "The redis backend is not installed: pip install skunkqueue-redis"
    ) from exc

__all__ = ["default_cfg"]
