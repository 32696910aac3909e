"""Plugin hooks: observe the job and worker lifecycle, the way llm and datasette do.

Plugins may also add commands to ``skunq`` with ``register_commands(cli)``
(``skunkqueue-web`` adds ``skunq web`` that way).

A plugin is a module with functions marked ``@skunkqueue.hookimpl`` and is
registered under the ``skunkqueue.plugins`` entry point group (or with
``pm.register(module)`` in-process). Hooks run in the worker process; an
exception in a hook is logged and does not affect the job.
"""

from __future__ import annotations

import logging
import pkgutil
import sys
from typing import Any, Sequence

import pluggy

from skunkqueue.record import JobRecord, Outcome, WorkerInfo

hookspec = pluggy.HookspecMarker("skunkqueue")
hookimpl = pluggy.HookimplMarker("skunkqueue")
log = logging.getLogger("skunkqueue.hooks")


class Hooks:
    @hookspec
    def worker_started(self, worker: WorkerInfo) -> None:
        """A worker registered and is about to take jobs."""

    @hookspec
    def worker_stopped(self, worker: WorkerInfo) -> None:
        """A worker unregistered and is about to exit."""

    @hookspec
    def job_sending(self, records: list[JobRecord], headers: list[dict[str, str]]) -> None:
        """A producer is about to enqueue ``records`` (one ``fire``/``fire_many``/``afire`` call).

        ``headers[i]`` starts empty and travels with ``records[i]`` (see :mod:`skunkqueue.headers`):
        fill it in (e.g. with a trace context). Runs in the producer, before records are signed.
        """

    @hookspec
    def job_sent(self, records: list[JobRecord], error: BaseException | None) -> None:
        """The enqueue that ``job_sending`` announced is over: stored, or failed with ``error``.

        Always follows ``job_sending``, with the same list; a record whose idempotency key
        was already held now carries the existing job's id.
        """

    @hookspec
    def job_started(self, record: JobRecord) -> None:
        """A worker is about to call the job's function (its signature, if any, checked)."""

    @hookspec
    def job_finished(self, record: JobRecord, outcome: Outcome) -> None:
        """The job's outcome was recorded (any state, including retries)."""

    @hookspec
    def job_failed(self, record: JobRecord, error: dict[str, str]) -> None:
        """The job raised, timed out or could not be run."""

    @hookspec
    def job_lost(self, record: JobRecord) -> None:
        """The attempt ended but its outcome was discarded: the worker lost the lease
        (another worker may own the job now). No ``job_finished`` follows."""

    @hookspec
    def register_commands(self, cli: Any) -> None:
        """Add commands to the ``skunq`` click group ``cli`` (called once, when the CLI loads)."""


GROUP = "skunkqueue.plugins"
_pm: pluggy.PluginManager | None = None
_known: list[tuple[str, str]] | None = None  # set by use_entries: the plugins, already looked up


def entries() -> list[tuple[str, str]]:
    """The ``(name, "module:attribute")`` of every plugin registered under the entry point group.

    A pool looks them up once and hands them to its workers (:func:`use_entries`).
    """
    if _known is not None:
        return list(_known)
    # Imported here for start-up speed, not to dodge a cycle (see skunkqueue.backends._entry_points).
    if sys.version_info >= (3, 10):
        from importlib.metadata import entry_points
    else:  # pragma: no cover - exercised on 3.9 only
        from importlib_metadata import entry_points
    found: dict[str, str] = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep.value)
    return list(found.items())


def use_entries(known: Sequence[Sequence[str]]) -> None:
    """Load these plugins instead of scanning the installed distributions for them.

    Scanning costs a fresh interpreter about 20 ms (importlib.metadata and every
    distribution's entry points); a worker is told its pool's findings instead.
    Only before the plugin manager exists: it loads plugins once.
    """
    global _known
    if _pm is None:
        _known = [(name, value) for name, value in known]


def plugin_manager() -> pluggy.PluginManager:
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("skunkqueue")
        pm.add_hookspecs(Hooks)
        if _known is None:
            pm.load_setuptools_entrypoints(GROUP)
        else:
            for name, value in _known:  # what load_setuptools_entrypoints does with each
                if pm.get_plugin(name) is None and not pm.is_blocked(name):
                    pm.register(pkgutil.resolve_name(value), name=name)
        _pm = pm
    return _pm


def implemented(name: str) -> bool:
    """Whether any plugin implements hook ``name`` (lets callers skip preparing its arguments)."""
    return bool(getattr(plugin_manager().hook, name).get_hookimpls())


def call(name: str, **kwargs: Any) -> None:
    """Run a hook; a failing plugin is logged, never allowed to break the worker."""
    try:
        caller = getattr(plugin_manager().hook, name)
        # Hooks run for every job: skip pluggy's call machinery when nothing implements this one.
        if caller.get_hookimpls():
            caller(**kwargs)
    except Exception:
        log.exception("plugin hook %s failed", name)
