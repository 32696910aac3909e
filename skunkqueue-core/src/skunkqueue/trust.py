"""The trust boundary between the store and a worker: which records a worker runs.

A record names its function as ``module:qualname``, and anyone who can write
to the store can write any name. A worker therefore runs a record only if the
function was declared with ``@queue.event`` on the worker's own queue and for
the worker's route, in this process (see :func:`declare`). Reaching that
declaration may need an import, and importing runs a module's top-level code,
so the worker decides *before* importing whether the module is one the
operator allowed:

* explicit mode (``skunq work --import myapp.jobs``, or ``SKUNQ_IMPORT``):
  the named modules are imported at start and a record never causes an import;
* bare mode (no ``--import``): a module is imported on demand only if it is
  found under the working directory or a ``--path`` root, never from the
  standard library, site-packages or any other entry of ``sys.path``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import site
import sys
import sysconfig
import weakref
from importlib.machinery import BuiltinImporter, FrozenImporter, ModuleSpec, PathFinder
from types import ModuleType
from typing import Any, Iterable, Protocol, Sequence

from skunkqueue.errors import ConfigurationError, JobRefused
from skunkqueue.record import JobRecord

IMPORT_ENV = "SKUNQ_IMPORT"



class Declared(Protocol):
    """What this module reads of a job declared with ``@queue.event`` (a :class:`skunkqueue.job.Job`,
    which stands on this module and hands itself in)."""

    @property
    def name(self) -> str: ...

    @property
    def routes(self) -> Sequence[str]: ...

    @property
    def priority(self) -> int: ...

    @property
    def limit(self) -> Any: ...  # a skunkqueue.flow.Limit or None


# (job name, queue, route) -> the Job declared for it. Weak: a Job that nobody
# holds any more (a producer's throwaway declaration) is not kept alive, nor
# is the queue and connection it references.
_declared: weakref.WeakValueDictionary[tuple[str, str, str], Declared] = weakref.WeakValueDictionary()


def declare(job: Declared, queue: str) -> None:
    """Called by ``@queue.event``: ``job`` may run on ``queue``, for its routes."""
    for route in job.routes:
        _declared[(job.name, queue, route)] = job


def declared(name: str, queue: str, route: str) -> Declared | None:
    return _declared.get((name, queue, route))


def declared_on(queue: str, routes: Iterable[str]) -> list[Declared]:
    """The jobs declared on ``queue`` for any of ``routes`` (a pool checks what it will serve)."""
    wanted = set(routes)
    return [job for (_, q, r), job in list(_declared.items()) if q == queue and r in wanted]


def _declared_elsewhere(name: str) -> list[tuple[str, str]]:
    return sorted({(q, r) for (n, q, r) in list(_declared.keys()) if n == name})


def check_address(record: JobRecord, queue: str, route: str, worker_id: str) -> None:
    """Refuse a record that is not addressed to this worker's queue, route (and, broadcast, itself).

    The store decides which records a worker claims; the record's own fields
    say (and its signature vouches for) where it was fired to. A copy moved
    into another queue's or route's keys, or into another worker's broadcast,
    keeps a valid signature, so the worker compares the two itself.
    """
    wrong = []
    if record.queue != queue:
        wrong.append(f"queue {record.queue!r}")
    if record.route != route:
        wrong.append(f"route {record.route!r}")
    if record.target is not None and record.target != worker_id:
        wrong.append(f"worker {record.target!r} (a broadcast)")
    if wrong:
        raise JobRefused(
            f"Job {record.id} was fired for {', '.join(wrong)}, not for this worker's queue {queue!r}, "
            f"route {route!r}: it was moved in the store. Nothing of it ran."
        )


def split_imports(values: Iterable[str]) -> list[str]:
    """``--import`` values (repeatable, each may list several, comma or space separated)."""
    names = [part for value in values for part in value.replace(",", " ").split()]
    for name in names:
        if not _is_module_name(name):
            raise ConfigurationError(f"--import {name!r} is not a module name such as myapp.jobs.")
    return list(dict.fromkeys(names))


def import_allowed(modules: Sequence[str]) -> None:
    """Import the operator's job modules (explicit mode); one clear error if one fails."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigurationError(
                f"Cannot import --import module {name!r}: {exc}. Start the worker in the directory "
                "that holds it, or pass --path."
            ) from None
        except (Exception, SystemExit) as exc:
            raise ConfigurationError(
                f"Importing --import module {name!r} failed: {type(exc).__name__}: {exc}"
            ) from None


def resolve(name: str, queue: str, route: str, *, imports: Sequence[str] = (),
            paths: Sequence[str] = ()) -> Declared:
    """The Job that a worker of ``queue``/``route`` runs for a record naming ``name``.

    ``imports`` non-empty is explicit mode (nothing is imported here);
    otherwise ``module`` may be imported if it lies under the working
    directory or one of ``paths``. Raises JobRefused, naming why.
    """
    module_name, _, qualname = name.partition(":")
    if not _is_module_name(module_name) or not all(p.isidentifier() for p in qualname.split(".")):
        raise JobRefused(f"{name!r} is not a job name of the form 'module:function'.")
    job = declared(name, queue, route)
    if job is not None:
        return job
    if module_name not in sys.modules:
        if imports:
            raise JobRefused(
                f"Refused to import module {module_name!r} for job {name!r}: this worker runs only "
                f"jobs of the modules named with --import ({', '.join(imports)})."
            )
        _import_under_roots(module_name, name, [os.getcwd(), *paths])
        job = declared(name, queue, route)
        if job is not None:
            return job
    elsewhere = _declared_elsewhere(name)
    routes = [r for q, r in elsewhere if q == queue]
    if routes:
        raise JobRefused(
            f"{name!r} is declared with @queue.event on queue {queue!r} for route(s) "
            f"{', '.join(map(repr, routes))}, not for route {route!r}, so this worker does not run it."
        )
    if elsewhere:
        # Other queues are not named: the message lands in this queue's store,
        # where another tenant's queue names are none of its writers' business.
        raise JobRefused(
            f"{name!r} is declared with @queue.event on another queue, not on queue {queue!r}, "
            "so this worker does not run it."
        )
    # Only the module's namespace is read: getattr could run a module __getattr__ or a property.
    namespace = getattr(sys.modules.get(module_name), "__dict__", {})
    if qualname.split(".")[0] not in namespace:
        raise JobRefused(f"Module {module_name!r} has no job {qualname!r}.")
    raise JobRefused(f"{name!r} is not decorated with @queue.event, so workers will not run it.")


# -- bare mode: import only what lies under the roots -------------------------------


def _is_module_name(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def _system_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    dirs = [paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths]
    try:
        dirs += site.getsitepackages()
    except AttributeError:  # pragma: no cover - some virtualenv versions
        pass
    user = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    if user:
        dirs.append(user)
    return [os.path.realpath(d) for d in dirs]


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _locations(spec: ModuleSpec) -> list[str]:
    places = list(spec.submodule_search_locations or [])
    if spec.origin and spec.has_location:
        places.append(spec.origin)
    return [os.path.realpath(p) for p in places]


def _load(spec: ModuleSpec, parent: ModuleType | None) -> ModuleType:
    """Execute exactly the module ``spec`` describes (the one checked), as ``import`` would.

    ``importlib.import_module`` would search ``sys.path`` again, where an entry
    ahead of the roots could supply another file of the same name.
    """
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        if spec.loader is not None:  # None: a namespace package, nothing to execute
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    if parent is not None:
        setattr(parent, spec.name.rpartition(".")[2], module)
    return sys.modules[spec.name]


def _import_under_roots(module_name: str, job_name: str, roots: list[str]) -> ModuleType:
    """Import ``module_name`` (and its parents) only if each is found under ``roots``."""
    real_roots = [os.path.realpath(r) for r in roots]
    system = _system_dirs()
    shown = ", ".join(roots)

    def refuse(what: str, where: str) -> JobRefused:
        return JobRefused(
            f"Refused to import module {what!r} for job {job_name!r}: {where}. Without --import a "
            f"worker imports only modules under its working directory and --path roots ({shown})."
        )

    search: list[str] = roots
    module: ModuleType | None = None
    parts = module_name.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        if depth == 1 and (BuiltinImporter.find_spec(name) or FrozenImporter.find_spec(name)):
            raise refuse(name, "it is built into Python")
        spec = PathFinder.find_spec(name, search)
        if spec is None:
            if depth == 1:
                elsewhere = PathFinder.find_spec(name)
                if elsewhere is not None:
                    origin = elsewhere.origin or ", ".join(elsewhere.submodule_search_locations or [])
                    raise refuse(name, f"it lives outside them ({origin})")
            raise JobRefused(
                f"Cannot import module {name!r} for job {job_name!r}: no such module under the "
                f"worker's working directory or --path roots ({shown})."
            )
        places = _locations(spec)
        if (not places or not all(any(_within(p, r) for r in real_roots) for p in places)
                or any(_within(p, s) for p in places for s in system)):
            raise refuse(name, f"it lives outside them ({', '.join(places) or 'no file'})")
        loaded = sys.modules.get(name)
        if loaded is not None:
            spec_of_loaded = getattr(loaded, "__spec__", None)
            if spec_of_loaded is None or _locations(spec_of_loaded) != places:
                raise refuse(name, "a module of that name is already loaded from elsewhere")
            module = loaded
        else:
            # Whatever the module raises at import propagates as it is: the worker
            # records it on the attempt with its real type and traceback (and retries).
            module = _load(spec, parent=module)
        search = list(getattr(module, "__path__", None) or [])
        if depth < len(parts) and not search:
            raise JobRefused(f"Cannot import module {module_name!r} for job {job_name!r}: "
                             f"{name!r} is not a package.")
    assert module is not None
    return module
