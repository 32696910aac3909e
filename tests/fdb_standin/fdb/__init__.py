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


def _real_package_dir() -> str:
    dist = importlib.metadata.distribution("foundationdb")
    return os.fspath(dist.locate_file("fdb"))


__path__.append(_real_package_dir())  # continue into the real bindings

# The header version of the installed bindings (7.3.x: 730, 8.0.0: 800), as the real package has it.
from fdb.apiversion import LATEST_API_VERSION  # noqa: E402

__version__ = importlib.metadata.version("foundationdb") + "-standin"


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
    header_version = LATEST_API_VERSION
    if ver < 520:
        raise RuntimeError("the FoundationDB stand-in supports API versions 520 and later only")
    if ver > header_version:
        raise RuntimeError(f"Latest known FDB API version is {header_version}")
    from fdb import impl
    from fdb.standin_faults import FAULTS

    # What libfdb_c's fdb_select_api_version_impl refuses (2203), and the real binding's words for it.
    max_supported = FAULTS.client_max_api
    if header_version > max_supported:
        raise RuntimeError(
            "This version of the FoundationDB Python binding is not supported by the installed "
            "FoundationDB C library. The binding requires a library that supports API version "
            f"{header_version}, but the installed library supports a maximum version of {max_supported}.")
    if ver > max_supported:
        raise RuntimeError(f"API version {ver} is not supported by the installed FoundationDB C library.")
    from fdb.subspace_impl import Subspace

    for name in ("FDBError", "Future", "Database", "Transaction", "KeyValue", "open", "transactional"):
        globals()[name] = getattr(impl, name)
    globals()["Subspace"] = Subspace
    globals()["_version"] = ver


def open(*args: object, **kwargs: object) -> object:
    raise RuntimeError("You must call api_version() before using any fdb methods")


def transactional(*args: object, **kwargs: object) -> object:
    raise RuntimeError("You must call api_version() before using fdb.transactional")
