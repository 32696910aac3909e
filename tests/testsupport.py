"""Helpers shared by the test folders (importable because tests/conftest.py's folder is on sys.path)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

TESTS = Path(__file__).resolve().parent


def load_helper(backend: str, filename: str = "servers.py") -> ModuleType:
    """Import ``tests/<backend>/<filename>`` once, under a name no other module uses.

    Every backend folder has a ``servers.py``, and the folders cannot be
    packages (``tests/redis`` would shadow redis-py), so they load by path.
    """
    path = TESTS / backend / filename
    name = f"skunkqueue_tests_{backend}_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    if not path.exists():
        raise RuntimeError(f"{path} does not exist: the {backend} backend's server helpers are missing")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
