"""Finding backends through the ``skunkqueue.backends`` entry point group.

Only the backend asked for is imported, so a broken or slow-to-import backend
cannot slow down or break the others.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from skunkqueue.errors import BackendNotFound, ConfigurationError
from skunkqueue.persistence import Persistence
from skunkqueue.urls import redact

if sys.version_info >= (3, 10):
    from importlib.metadata import EntryPoint, entry_points
else:  # pragma: no cover - exercised on 3.9 only
    from importlib_metadata import EntryPoint, entry_points

GROUP = "skunkqueue.backends"
DEFAULT_BACKEND = "sqlite"

# The first-party backends and the distribution that provides each.
KNOWN_DISTRIBUTIONS = {
    "sqlite": "skunkqueue",
    "mongodb": "skunkqueue-mongo",
    "redis": "skunkqueue-redis",
    "fdb": "skunkqueue-fdb",
    "postgres": "skunkqueue-postgres",
}


@dataclass(frozen=True)
class BackendEntry:
    name: str
    value: str          # "module:attribute"
    distribution: str


def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep)
    return found


def entry_point(name: str) -> EntryPoint | None:
    """The entry point registered for backend ``name``, without importing anything of it."""
    return _entry_points().get(name)


def installed() -> list[BackendEntry]:
    """Every registered backend, without importing any of them."""
    entries = []
    for name, ep in sorted(_entry_points().items()):
        dist = getattr(ep, "dist", None)
        entries.append(BackendEntry(name, ep.value, dist.name if dist else "?"))
    return entries


def load(name: str) -> type[Persistence]:
    """The backend class registered as ``name``, or a BackendNotFound that says what to do."""
    ep = _entry_points().get(name)
    if ep is None:
        names = ", ".join(sorted(_entry_points())) or "none"
        hint = ""
        if name in KNOWN_DISTRIBUTIONS:
            hint = f" Install it with: pip install {KNOWN_DISTRIBUTIONS[name]}"
        raise BackendNotFound(
            f"No SkunkQueue backend named {name!r} is installed (installed: {names}).{hint}"
        )
    try:
        cls = ep.load()
    except ImportError as exc:
        raise BackendNotFound(
            f"The {name!r} backend is registered but cannot be imported: {exc}. "
            f"Reinstall its distribution ({KNOWN_DISTRIBUTIONS.get(name, ep.value)})."
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Persistence)):
        raise BackendNotFound(f"The {name!r} entry point ({ep.value}) is not a Persistence subclass.")
    return cls


def backend_for_url(url: str) -> str:
    """The name of the installed backend that takes ``url`` (by its scheme: see
    ``Persistence.url_schemes``), or a ConfigurationError that says what to do.

    Backends are imported one at a time until one takes the address: those whose
    name is part of the scheme first (``redis+cluster`` -> ``redis``), for an
    address without a scheme (a file path) the embedded one first, then the other
    first-party ones, then the rest by name. So the usual address imports only its
    own backend (importing the others' drivers would cost a second). A backend that
    cannot be imported is passed over.
    """
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower() if sep else ""

    def order(name: str) -> tuple[bool, bool, str]:
        first = name in scheme if scheme else name == DEFAULT_BACKEND
        return (not first, name not in KNOWN_DISTRIBUTIONS, name)

    for name in sorted(_entry_points(), key=order):
        try:
            cls = load(name)
        except BackendNotFound:
            continue
        if cls.takes_url(url):
            return name
    where = redact(url)
    if sep:
        raise ConfigurationError(
            f"No installed backend takes {scheme}:// addresses ({where}); install the backend for it "
            "(see `skunq backends`) or name one with --backend or SKUNQ_BACKEND.")
    raise ConfigurationError(
        f"The address {where} has no scheme, so it does not say which backend it is for: write it as a URL "
        "(redis://HOST:PORT, mongodb://HOST:PORT, sqlite:///PATH, fdb:///CLUSTER_FILE...) or name the "
        "backend with --backend or SKUNQ_BACKEND.")


def open_backend(queue: str, backend: str | None = None, *, url: str | None = None,
                 db: str | None = None, **options: Any) -> Persistence:
    """Open ``backend`` for ``queue`` (no backend: the one ``url``'s scheme names, else the embedded one)."""
    if not queue or not isinstance(queue, str):
        raise ConfigurationError("A queue needs a non-empty name, e.g. SkunkQueue('emails').")
    if backend is None and url:
        backend = backend_for_url(url)
    cls = load(backend or DEFAULT_BACKEND)
    cls.check_names(queue)
    return cls(queue, url=url, db=db, **options)
