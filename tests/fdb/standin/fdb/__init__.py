"""STAND-IN for the ``fdb`` package (FoundationDB's Python bindings). Not FoundationDB.

Placed first on ``sys.path``/``PYTHONPATH`` by the tests, it shadows the real
bindings, which cannot work here because no libfdb_c is installed. It offers
the same names (``api_version``, ``open``, ``transactional``, ``FDBError``,
``Subspace``, ``tuple``) backed by ``standin_server.py``. The pure-Python
modules of the real bindings (``fdb.tuple``, ``fdb.subspace_impl``) are used
as they are: this package's ``__path__`` continues into the real one.
"""

from __future__ import annotations

import importlib.metadata
import os

STANDIN = True  # lets tests assert they really run against the stand-in

LATEST_API_VERSION = 800
__version__ = "8.0.0-standin"


def _real_package_dir() -> str:
    dist = importlib.metadata.distribution("foundationdb")
    return os.fspath(dist.locate_file("fdb"))


__path__.append(_real_package_dir())  # continue into the real bindings


def is_api_version_selected() -> bool:
    return "_version" in globals()


def get_api_version() -> int:
    if is_api_version_selected():
        return globals()["_version"]
    raise RuntimeError("API version is not set")


def api_version(ver: int) -> None:
    if "_version" in globals():
        if globals()["_version"] != ver:
            raise RuntimeError(f"FDB API already loaded at version {globals()['_version']}")
        return
    if ver < 520:
        raise RuntimeError("the FoundationDB stand-in supports API versions 520 and later only")
    if ver > LATEST_API_VERSION:
        raise RuntimeError(f"Latest known FDB API version is {LATEST_API_VERSION}")
    from fdb import impl
    from fdb.subspace_impl import Subspace

    for name in ("FDBError", "Future", "Database", "Transaction", "KeyValue", "open", "transactional"):
        globals()[name] = getattr(impl, name)
    globals()["Subspace"] = Subspace
    globals()["_version"] = ver


def open(*args: object, **kwargs: object) -> object:
    raise RuntimeError("You must call api_version() before using any fdb methods")


def transactional(*args: object, **kwargs: object) -> object:
    raise RuntimeError("You must call api_version() before using fdb.transactional")
