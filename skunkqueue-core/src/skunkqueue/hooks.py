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
from typing import Any

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


_pm: pluggy.PluginManager | None = None


def plugin_manager() -> pluggy.PluginManager:
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("skunkqueue")
        pm.add_hookspecs(Hooks)
        pm.load_setuptools_entrypoints("skunkqueue.plugins")
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
