"""The rules for jobs that wait for other jobs (workflows), kept once for every backend.

A record with ``parents`` is stored *waiting*: its public state is ``pending``
but its ``due`` is :data:`WAITING_DUE`, so no claim (which takes records due
by now) ever sees it. The store counts its parents down with a *set* of
finished parents, inside the same atomic step as each parent's finish, so a
finish that is retried, replayed or fenced off (a stale token changes nothing)
cannot count twice. When the last parent has finished the store *releases* the
record (``due`` becomes the store's now: claimable, exactly once, since only
a waiting record is released). When a parent ends ``error`` or ``killed`` and
the record was not fired with ``on_failure="run"``, the store ends it
``killed`` with :func:`dependency_failed` at once instead, and that finish
counts down its own dependents in turn.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Protocol, Sequence

from skunkqueue import serializer
from skunkqueue.record import COMPLETE, KILLED, JobRecord, Outcome

# The ``due`` of a waiting record: far beyond any real time (the year 5138), finite so that
# every store and encoding (JSON, Lua numbers, sorted-set scores) keeps it exactly, and
# within what datetime can show (the year 9999), so monitors and the CLI can print it.
WAITING_DUE = 1e11

#: ``on_failure`` values a producer may give: ``"kill"`` (the default, stored as None) or ``"run"``.
ON_FAILURE = ("kill", "run")
RUN_ANYWAY = "run"

#: What a dependent's error type is when a parent failed.
DEPENDENCY_FAILED = "DependencyFailed"


def waiting(record: JobRecord) -> bool:
    """True while a record waits for its parents (pending, not yet released)."""
    return record.state == "pending" and record.due >= WAITING_DUE


def runs_anyway(record: JobRecord) -> bool:
    return record.on_failure == RUN_ANYWAY


def kills_dependent(parent_state: str, run_anyway: bool) -> bool:
    """Whether a parent that ended ``parent_state`` ends a dependent ``killed`` (at once)."""
    return parent_state != COMPLETE and not run_anyway


def dependency_failed(parent_id: str, parent_state: str) -> Outcome:
    """The outcome of a dependent whose parent ended ``error`` or ``killed``.

    ``JobFailed`` shows it as ``DependencyFailed: <id> ended error``.
    """
    return Outcome(KILLED, error={"type": DEPENDENCY_FAILED, "message": f"{parent_id} ended {parent_state}",
                                 "traceback": ""})


def missing_parent_state() -> str:
    """How a parent that no longer exists (expired, purged) counts: it cannot be shown to have completed."""
    return KILLED


def flatten(structure: Any) -> Iterator[str]:
    """The job ids in a nested list of ids (a workflow step's ``inputs``), in order."""
    if isinstance(structure, str):
        yield structure
    elif isinstance(structure, (list, tuple)):
        for item in structure:
            yield from flatten(item)


def unique(ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(ids))


class Parents(Protocol):
    """What :func:`gather` reads of a store: the parents' records (``JobStore.get_many``). Stated here,
    not imported: the stores stand on this module (their finish applies its rules)."""

    def get_many(self, job_ids: Sequence[str]) -> list[JobRecord | None]: ...


def gather(backend: Parents, record: JobRecord) -> tuple[Any, dict[str, str]]:
    """What a released record gets from its parents: (the value of its ``inputs``, {parent id: state}).

    Results are read from the store (the producer may be gone) and decoded with the
    record's serializer; a parent that did not complete gives None.
    """
    if not record.parents and record.inputs is None:
        return None, {}
    ids = unique([*(record.parents or ()), *flatten(record.inputs)])
    parents = dict(zip(ids, backend.get_many(ids)))
    # Built once: a chord's callback has one parent per member, and a set made per parent inside
    # the comprehension made its start O(members^2) (10,000 members: 10^8 insertions, seconds).
    waited_for = set(record.parents or ())
    states = {pid: (p.state if p is not None else missing_parent_state()) for pid, p in parents.items()
              if pid in waited_for}

    def value(structure: Any) -> Any:
        if isinstance(structure, str):
            parent = parents.get(structure)
            if parent is None or parent.state != COMPLETE or parent.result is None:
                return None
            return serializer.loads(parent.result, record.serializer, what="result")
        return [value(item) for item in structure]

    return (None if record.inputs is None else value(record.inputs)), states


def resolve_results(records: Mapping[str, JobRecord | None], structure: Any,
                    serializer_name: str) -> Any:
    """The nested results of ``structure`` (ids), from records that all completed."""
    if isinstance(structure, str):
        record = records[structure]
        if record is None or record.result is None:
            return None
        return serializer.loads(record.result, serializer_name, what="result")
    return [resolve_results(records, item, serializer_name) for item in structure]

