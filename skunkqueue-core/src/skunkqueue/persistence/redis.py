"""The seed's import path: ``from skunkqueue.persistence.redis import default_cfg``.

The backend ships in the ``skunkqueue-redis`` distribution. Core does not import it by
name: attributes are looked up through the ``skunkqueue.backends`` entry point
``redis`` when first asked for, so this module imports nothing of the backend.
"""

from __future__ import annotations

from typing import Any

from skunkqueue.config import seed_attribute


def __getattr__(name: str) -> Any:
    return seed_attribute("redis", name)
