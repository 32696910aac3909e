"""Finding backends through the ``skunkqueue.backends`` entry point group.

Only the backend asked for is imported, so a broken or slow-to-import backend
cannot slow down or break the others.
"""

from __future__ import annotations

import pkgutil
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from skunkqueue.errors import BackendNotFound, ConfigurationError
from skunkqueue.persistence import Persistence
from skunkqueue.urls import redact

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

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
    # Imported here for start-up speed, not to dodge a cycle: importlib.metadata (with email,
    # zipfile, csv...) costs about 15 ms, and a worker told its backend's entry (WorkerConfig.entry)
    # never scans the installed distributions.
    if sys.version_info >= (3, 10):
        from importlib.metadata import entry_points
    else:  # pragma: no cover - exercised on 3.9 only
        from importlib_metadata import entry_points
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


def load(name: str, entry: str | None = None) -> type[Persistence]:
    """The backend class registered as ``name``, or a BackendNotFound that says what to do.

    ``entry``: the entry point's value (``module:attribute``) someone already looked up for
    ``name`` (a pool passes it to its workers): imported without scanning the installed
    distributions, which costs a fresh interpreter about 20 ms.
    """
    if entry is not None:
        try:
            found = pkgutil.resolve_name(entry)
        except (ImportError, AttributeError, ValueError) as exc:
            raise BackendNotFound(
                f"The {name!r} backend ({entry}) cannot be imported: {exc}. "
                f"Reinstall its distribution ({KNOWN_DISTRIBUTIONS.get(name, entry)})."
            ) from None
        return _checked(name, entry, found)
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
    return _checked(name, ep.value, cls)


def _checked(name: str, value: str, cls: Any) -> type[Persistence]:
    if not (isinstance(cls, type) and issubclass(cls, Persistence)):
        raise BackendNotFound(f"The {name!r} entry point ({value}) is not a Persistence subclass.")
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
                 db: str | None = None, entry: str | None = None, **options: Any) -> Persistence:
    """Open ``backend`` for ``queue`` (no backend: the one ``url``'s scheme names, else the embedded one).

    ``entry``: ``backend``'s entry point value, if already known (see :func:`load`)."""
    if not queue or not isinstance(queue, str):
        raise ConfigurationError("A queue needs a non-empty name, e.g. SkunkQueue('emails').")
    if backend is None and url:
        backend = backend_for_url(url)
    cls = load(backend or DEFAULT_BACKEND, entry if backend else None)
    cls.check_names(queue)
    return cls(queue, url=url, db=db, **options)
