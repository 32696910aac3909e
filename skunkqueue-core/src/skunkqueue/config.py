"""Which store a queue, a worker pool or the monitor uses: one rule for all of them.

1. Explicit arguments (``SkunkQueue(name, backend=..., conn_url=..., dbname=...)``,
   ``skunq ... --backend/--url/--db``): when a backend or an address is given,
   the store comes from the arguments alone.
2. Else the environment: ``SKUNQ_BACKEND``, ``SKUNQ_URL``, ``SKUNQ_DB``.
3. Else the embedded default: SQLite (``SKUNQ_SQLITE_PATH`` or its default file).

``--db``/``dbname`` given alone refines the store of rule 2 or 3, and an
address without a scheme (``--url host:port``) takes its backend (and database)
from ``SKUNQ_BACKEND`` (``SKUNQ_DB``) when that is set. Within a
rule, an address without a backend name chooses its backend by its scheme
(``redis://`` -> redis, ``mongodb://`` -> mongodb, ...): every installed
backend declares the addresses it takes (:meth:`Persistence.takes_url`), so a
third-party backend joins by declaring its own ``url_schemes``.

So a producer (``SkunkQueue('q')``), ``skunq work`` and ``skunq web`` started
in one shell reach the same store, whatever that shell sets.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

from skunkqueue import backends
from skunkqueue.errors import ConfigurationError
from skunkqueue.urls import redact

BACKEND_ENV = "SKUNQ_BACKEND"
URL_ENV = "SKUNQ_URL"
DB_ENV = "SKUNQ_DB"

log = logging.getLogger("skunkqueue")


@dataclass(frozen=True)
class Store:
    """A resolved store: a backend name, its address and database (None: the backend's default)."""

    backend: str
    url: str | None
    db: str | None
    source: str  # "arguments", "environment" or "default": where the rule found it

    def describe(self) -> str:
        """``backend address [db N]`` with any password replaced by ``***``."""
        return f"{self.backend} {redact(self.url)}" + (f" db {self.db}" if self.db else "")


def _set(value: str | None) -> str | None:
    return value if value not in (None, "") else None


def resolve(backend: str | None = None, url: str | None = None, db: str | None = None, *,
            env: Mapping[str, str] | None = None) -> Store:
    """The store named by the arguments, else by ``SKUNQ_*``, else the embedded default (see the module)."""
    env = os.environ if env is None else env
    backend, url, db = _set(backend), _set(url), _set(db)
    if backend is None and url is not None and "://" not in url and _set(env.get(BACKEND_ENV)) is not None:
        # A scheme-less address (host:port) says where, not which backend: SKUNQ_BACKEND says that,
        # and SKUNQ_DB goes with it.
        backend = env[BACKEND_ENV]
        db = db if db is not None else _set(env.get(DB_ENV))
        return Store(backend, url, db, "arguments")
    if backend is not None or url is not None:
        source = "arguments"
    else:
        backend, url, source = _set(env.get(BACKEND_ENV)), _set(env.get(URL_ENV)), "environment"
        db = db if db is not None else _set(env.get(DB_ENV))
        if backend is None and url is None:
            source = "default" if db is None else source
    if backend is None:
        backend = backends.DEFAULT_BACKEND if url is None else backends.backend_for_url(url)
    return Store(backend, url, db, source)


def seed_cfg(backend: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``default_cfg`` of ``skunkqueue.persistence.<backend>``: the environment's store when it is on
    this backend, else the backend's own defaults (``defaults``)."""
    cfg = dict(defaults)
    if _set(os.environ.get(BACKEND_ENV)) is None and _set(os.environ.get(URL_ENV)) is None:
        if _set(os.environ.get(DB_ENV)) is not None:
            cfg["dbname"] = os.environ[DB_ENV]
        return cfg
    try:
        store = resolve()
    except ConfigurationError as exc:
        log.warning("%s; default_cfg of skunkqueue.persistence.%s keeps its defaults", exc, backend)
        return cfg
    if store.backend == backend:
        if store.url is not None:  # the address's own database (redis://h/2) unless SKUNQ_DB says otherwise
            cfg["conn_url"], cfg["dbname"] = store.url, store.db
        elif store.db is not None:
            cfg["dbname"] = store.db
    else:
        log.warning("SKUNQ_BACKEND/SKUNQ_URL name the %s backend (%s), but the code asks for "
                    "skunkqueue.persistence.%s.default_cfg: it uses %s %s", store.backend,
                    redact(store.url), backend, backend, redact(cfg.get("conn_url")))
    return cfg


def seed_attribute(backend: str, name: str) -> Any:
    """``name`` from the seed's ``skunkqueue.persistence.<backend>`` module, found through the entry point.

    Core never imports a backend package by name: the shim modules ask here,
    and the package is whatever the ``backend`` entry point lives in. The
    seed's ``default_cfg`` comes from that package's top level (cheap: no
    driver import); the entry point's own attribute (e.g. ``RedisPersistence``)
    loads the class.
    """
    ep = backends.entry_point(backend)
    if ep is None:
        distribution = backends.KNOWN_DISTRIBUTIONS.get(backend, f"a distribution registering {backend!r}")
        raise ImportError(f"The {backend} backend is not installed: pip install {distribution}")
    if name == ep.attr:
        return backends.load(backend)
    package = importlib.import_module(ep.module.partition(".")[0])
    if name == "default_cfg" and hasattr(package, name):
        return seed_cfg(backend, package.default_cfg)
    raise AttributeError(f"module 'skunkqueue.persistence.{backend}' has no attribute {name!r}")
