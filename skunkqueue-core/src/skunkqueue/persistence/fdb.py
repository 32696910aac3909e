"""The seed's import path: ``from skunkqueue.persistence.fdb import default_cfg``.

The backend itself ships in the ``skunkqueue-fdb`` distribution.
"""

from __future__ import annotations

try:
    from skunkqueue_fdb import default_cfg
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "The fdb backend is not installed: pip install skunkqueue-fdb"
    ) from exc

__all__ = ["default_cfg"]
