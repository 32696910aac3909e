"""Workflows: chains, groups, fan-in callbacks and plain dependencies.

``job.s(*args, **kwargs)`` is a signature (nothing is stored). ``chain(a, b, c)``
runs each step after the previous one completed, with the previous result as
its first argument; ``group(a, b)`` runs its members side by side, and what
follows a group gets the members' results as a list, in the order given;
``group(...).then(cb)`` is a chord: ``cb(results, ...)`` runs once, after every
member finished. Chains and groups nest. ``fire()`` stores every step at once,
each later step as a waiting record that the store releases (see
:mod:`skunkqueue.dependencies` and the ``Persistence`` docstring), so the
producer may exit right after ``fire()``: results travel through the store.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable, Protocol, Sequence

from skunkqueue import dependencies
from skunkqueue.errors import ConfigurationError, JobFailed
from skunkqueue.handle import JobHandle, QueueLike, due_time
from skunkqueue.handle import check_finished as _check_finished
from skunkqueue.persistence import Persistence
from skunkqueue.record import COMPLETE, ERROR, KILLED, PENDING, RUNNING, JobRecord, new_id


class Step(Protocol):
    """What a workflow reads of a job (a :class:`skunkqueue.job.Job`, whose ``s()`` makes a Signature
    here: the job model stands on this module)."""

    @property
    def name(self) -> str: ...

    @property
    def routes(self) -> Sequence[str]: ...

    @property
    def func(self) -> Callable[..., Any]: ...

    @property
    def queue(self) -> QueueLike: ...

    def check_arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None: ...


class Workflow:
    """A signature, chain or group: something that can be fired as a whole."""

    def then(self, step: Workflow) -> Chain:
        """This, then ``step`` (with this one's result, or the group's list of results, first)."""
        return Chain([self, _node(step)])

    def fire(self, *, key: str | None = None, using: Any = None) -> WorkflowHandle:
        """Store every step (the first ones due now) and return the workflow's handle.

        With ``key``, a second firing with the same key (while the first one's
        records exist) stores nothing and returns a handle to the first. With
        ``using``, every step is stored in the caller's open transaction, as
        ``Job.fire(..., using=...)`` stores one job.
        """
        return self._fire(time.time(), key, using)

    def fire_at(self, when: timedelta | datetime, *, key: str | None = None, using: Any = None) -> WorkflowHandle:
        """``fire``, with the first steps due after a delay or at an aware datetime."""
        return self._fire(due_time(when), key, using)

    async def afire(self, *, key: str | None = None) -> WorkflowHandle:
        """``fire`` for asyncio code."""
        return await self._afire(time.time(), key)

    async def afire_at(self, when: timedelta | datetime, *, key: str | None = None) -> WorkflowHandle:
        """``fire_at`` for asyncio code."""
        return await self._afire(due_time(when), key)

    def _fire(self, due: float, key: str | None, using: Any = None) -> WorkflowHandle:
        queue = self._queue()
        plan = _Plan(queue, queue.persistence, due)
        output = plan.add(self, None)
        holders = plan.store(key, using)
        return plan.handle(output, holders)

    async def _afire(self, due: float, key: str | None) -> WorkflowHandle:
        queue = self._queue()
        backend = await queue.aopen()
        plan = _Plan(queue, backend, due)
        output = plan.add(self, None)
        records, keyed = plan.keyed(key)
        with queue._sending(backend, records):
            holders = await backend.astore(records, keyed=keyed)
        return plan.handle(output, holders)

    def _signatures(self) -> Iterable[Signature]:
        raise NotImplementedError

    def _queue(self) -> QueueLike:
        signatures = list(self._signatures())
        if not signatures:
            raise ConfigurationError("This workflow has no steps; give chain() or group() at least one job.s(...).")
        queue = signatures[0].job.queue
        for signature in signatures:
            if signature.job.queue.name != queue.name:
                raise ConfigurationError(f"A workflow's jobs must be declared on one queue; {signature.job.name} is "
                                         f"on {signature.job.queue.name!r}, not {queue.name!r}.")
        return queue


class Signature(Workflow):
    """A job with arguments, not stored yet: what ``job.s(...)`` returns."""

    def __init__(self, job: Step, args: tuple[Any, ...], kwargs: dict[str, Any], route: str | None = None) -> None:
        if route is None and len(job.routes) != 1:
            raise ConfigurationError(f"{job.name} is declared on the routes {job.routes}; inside a workflow name "
                                     f"one: {job.func.__name__}.s(..., route={job.routes[0]!r}).")
        if route is not None and route not in job.routes:
            raise ConfigurationError(f"{job.name} is not declared on the route {route!r}; its routes are "
                                     f"{job.routes}.")
        self.job, self.args, self.kwargs = job, args, kwargs
        self.route = route if route is not None else job.routes[0]

    def __repr__(self) -> str:
        return f"{self.job.name}.s(*{self.args!r}, **{self.kwargs!r})"

    def _signatures(self) -> Iterable[Signature]:
        yield self


class Chain(Workflow):
    def __init__(self, steps: Sequence[Workflow]) -> None:
        self.steps = [_node(step) for step in steps]

    def then(self, step: Workflow) -> Chain:
        return Chain([*self.steps, _node(step)])

    def __repr__(self) -> str:
        return f"chain({', '.join(map(repr, self.steps))})"

    def _signatures(self) -> Iterable[Signature]:
        for step in self.steps:
            yield from step._signatures()


class Group(Workflow):
    def __init__(self, members: Sequence[Workflow]) -> None:
        self.members = [_node(member) for member in members]

    def __repr__(self) -> str:
        return f"group({', '.join(map(repr, self.members))})"

    def _signatures(self) -> Iterable[Signature]:
        for member in self.members:
            yield from member._signatures()


def _node(value: Any) -> Workflow:
    if not isinstance(value, Workflow):
        raise ConfigurationError(f"A workflow step must be job.s(...), chain(...) or group(...), not {value!r}.")
    return value


def _steps(items: tuple[Any, ...]) -> list[Any]:
    """The steps given as arguments, or as one iterable (a generator of signatures)."""
    if len(items) == 1 and not isinstance(items[0], Workflow) and isinstance(items[0], Iterable):
        return list(items[0])
    return list(items)


def chain(*steps: Workflow | Iterable[Workflow]) -> Chain:
    """Steps run one after the other; each gets the previous one's result as its first argument."""
    found = _steps(steps)
    if not found:
        raise ConfigurationError("chain() needs at least one step.")
    return Chain(found)


def group(*members: Workflow | Iterable[Workflow]) -> Group:
    """Members run side by side; what follows gets their results as a list, in this order."""
    return Group(_steps(members))


class _Plan:
    """The records of one firing, built depth first: parents always before their dependents."""

    def __init__(self, queue: QueueLike, backend: Persistence, due: float) -> None:
        check_supported(queue, backend)
        self.queue, self.backend, self.due = queue, backend, due
        self.id = new_id()
        self.records: list[JobRecord] = []

    def add(self, node: Workflow, feed: Any) -> Any:
        """Add ``node``'s records, fed by ``feed`` (ids of what precedes it, or None); return its output ids."""
        if isinstance(node, Signature):
            args = node.args if feed is None else (None, *node.args)
            node.job.check_arguments(args, node.kwargs)
            [[record]] = self.queue._records(self.backend, node.job, [(node.args, node.kwargs)], self.due, None,
                                             None, routes=[node.route])
            record.workflow = self.id
            if feed is not None:
                record.inputs = feed
                parents = dependencies.unique(dependencies.flatten(feed))
                if parents:
                    record.parents, record.due = parents, dependencies.WAITING_DUE
            self.records.append(record)
            return record.id
        if isinstance(node, Chain):
            for step in node.steps:
                feed = self.add(step, feed)
            return feed
        if isinstance(node, Group):
            if not node.members:
                # Its output would be [] whatever preceded it: what follows would not wait.
                raise ConfigurationError("A group in a workflow needs at least one member.")
            return [self.add(member, feed) for member in node.members]
        raise ConfigurationError(f"Not a workflow step: {node!r}")

    def keyed(self, key: str | None) -> tuple[list[JobRecord], bool]:
        if key is None:
            return self.records, False
        if not isinstance(key, str) or not key:
            raise ConfigurationError(f"An idempotency key must be a non-empty string, not {key!r}.")
        if not self.backend.supports_keys:
            raise ConfigurationError(f"The {self.backend.name} backend does not support idempotency keys (key=...).")
        for index, record in enumerate(self.records):
            # One key per member, derived from the workflow's: the first member holds the workflow's.
            record.key = json.dumps([record.route, key if index == 0 else f"{key}#{index}"])
        return self.records, True

    def store(self, key: str | None, using: Any = None) -> list[str] | None:
        records, keyed = self.keyed(key)
        with self.queue._sending(self.backend, records):
            return self.backend.store(records, keyed=keyed, using=using)

    def handle(self, output: Any, holders: list[str] | None) -> WorkflowHandle:
        workflow_id = self.id
        if holders is not None:
            # Members whose key was held point at the existing workflow's records.
            moved = {record.id: holder for record, holder in zip(self.records, holders)}
            first = self.records[0].id
            for record in self.records:
                record.id = moved[record.id]
            output = _rename(output, moved)
            if moved[first] != first:
                existing = self.backend.get(moved[first])
                workflow_id = existing.workflow if existing is not None and existing.workflow else workflow_id
        jobs = [JobHandle(self.queue, [record]) for record in self.records]
        return WorkflowHandle(self.queue, workflow_id, jobs, output)


def _rename(structure: Any, moved: dict[str, str]) -> Any:
    if isinstance(structure, str):
        return moved.get(structure, structure)
    return [_rename(item, moved) for item in structure]


def check_supported(queue: QueueLike, backend: Persistence) -> None:
    if not backend.supports_workflows:
        raise ConfigurationError(f"The {backend.name} backend does not support workflows (chain, group, "
                                 "fire(after=...)); use sqlite, redis, mongodb, postgres or fdb.")
    if queue.queue_type == "broadcast":
        raise ConfigurationError("Workflows need a direct queue: a broadcast's deliveries depend on which workers "
                                 "are alive when it is fired.")


def parent_ids(queue: QueueLike, after: Sequence[Any]) -> list[str]:
    """The job ids ``fire(after=[...])`` waits for: job handles, workflow handles (their last steps) or ids."""
    if isinstance(after, (str, JobHandle, WorkflowHandle)) or not isinstance(after, Iterable):
        raise ConfigurationError("after= takes a list of handles (or job ids), e.g. after=[h1, h2].")
    ids: list[str] = []
    for item in after:
        if isinstance(item, JobHandle):
            if item.queue.name != queue.name:
                raise ConfigurationError(f"after=: job {item.id} is on the queue {item.queue.name!r}, "
                                         f"not {queue.name!r}; dependencies stay within one queue.")
            ids.extend(item.ids)
        elif isinstance(item, WorkflowHandle):
            if item.queue.name != queue.name:
                raise ConfigurationError(f"after=: workflow {item.id} is on the queue {item.queue.name!r}, "
                                         f"not {queue.name!r}; dependencies stay within one queue.")
            ids.extend(dependencies.flatten(item.output))
        elif isinstance(item, str) and item:
            ids.append(item)
        else:
            raise ConfigurationError(f"after= takes handles or job ids, not {item!r}.")
    return dependencies.unique(ids)


def depend(queue: QueueLike, backend: Persistence, records: Sequence[JobRecord], after: Sequence[Any],
           on_failure: str | None, using: Any = None) -> None:
    """Make ``records`` wait for the jobs ``after`` names (``fire(after=..., on_failure=...)``).

    With ``using``, the parents are looked up in that transaction, where a parent fired in it exists.
    """
    check_supported(queue, backend)
    if on_failure is not None and on_failure not in dependencies.ON_FAILURE:
        raise ConfigurationError(f"on_failure takes {' or '.join(map(repr, dependencies.ON_FAILURE))}, "
                                 f"not {on_failure!r}.")
    parents = parent_ids(queue, after)
    stored = backend.get_many(parents) if using is None else backend.get_many_in(using, parents)
    missing = [pid for pid, found in zip(parents, stored) if found is None]
    if missing:
        raise ConfigurationError(f"after=: no job {missing[0]} in the queue {queue.name!r} (never fired, "
                                 "expired or purged).")
    for record in records:
        record.on_failure = dependencies.RUN_ANYWAY if on_failure == dependencies.RUN_ANYWAY else None
        if parents:
            record.parents, record.due = list(parents), dependencies.WAITING_DUE


class WorkflowHandle:
    """What firing a workflow returns: ``.id``, ``.jobs`` (every member's handle), ``.state``, ``.wait``."""

    def __init__(self, queue: QueueLike, workflow_id: str, jobs: list[JobHandle], output: Any) -> None:
        self.queue = queue
        self.id = workflow_id
        self.jobs = jobs
        self.output = output  # the ids whose results are the workflow's result (nested as the groups)
        self._serializer = queue.serializer

    def __repr__(self) -> str:
        return f"<WorkflowHandle {self.id} {len(self.jobs)} jobs {self.state}>"

    @property
    def ids(self) -> list[str]:
        return [job_id for handle in self.jobs for job_id in handle.ids]

    @property
    def state(self) -> str:
        """``pending``/``running`` while any member is; then ``error`` or ``killed`` if any member ended so,
        else ``complete``."""
        states = [r.state if r else ERROR for r in self.queue.persistence.get_many(self.ids)]
        if RUNNING in states:
            return RUNNING
        if PENDING in states:
            return PENDING
        for state in (ERROR, KILLED):
            if state in states:
                return state
        return COMPLETE

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the workflow's last steps finished; return their result (a group's: a list).

        Raises JobTimeout if ``timeout`` passes first, and JobFailed naming the step
        that failed (not the steps killed because of it).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        backend = self.queue.persistence
        ids = dependencies.unique(dependencies.flatten(self.output))
        # One batched look first: a group's members have mostly (after a callback, all) finished,
        # and a look per member was a round trip each (10,000 members: 1.9 s on Redis).
        finished: dict[str, JobRecord | None] = {
            job_id: record for job_id, record in zip(ids, backend.get_many(ids))
            if record is None or record.finished_state}
        for job_id in ids:
            if job_id in finished:
                record = finished[job_id]
            else:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                record = finished[job_id] = backend.wait_finished(job_id, left)
            if record is not None and record.state not in (COMPLETE, PENDING, RUNNING):
                self._raise_failure(backend.get_many(self.ids), job_id, record, timeout)
            _check_finished(job_id, record, timeout)
        return dependencies.resolve_results(finished, self.output, self._serializer)

    async def aresult(self, timeout: float | None = None) -> Any:
        """``wait`` for asyncio code."""
        deadline = None if timeout is None else time.monotonic() + timeout
        backend = await self.queue.aopen()
        finished: dict[str, JobRecord | None] = {}
        for job_id in dependencies.unique(dependencies.flatten(self.output)):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            record = finished[job_id] = await backend.await_finished(job_id, left)
            if record is not None and record.state not in (COMPLETE, PENDING, RUNNING):
                self._raise_failure([await backend.aget(i) for i in self.ids], job_id, record, timeout)
            _check_finished(job_id, record, timeout)
        return dependencies.resolve_results(finished, self.output, self._serializer)

    def __await__(self) -> Any:
        return self.aresult().__await__()

    def _raise_failure(self, members: list[JobRecord | None], job_id: str, record: JobRecord,
                       timeout: float | None) -> None:
        """JobFailed for the first member that failed by itself (not killed for a parent's failure)."""
        for member in members:
            if member is not None and member.state in (ERROR, KILLED) and \
                    (member.error or {}).get("type") != dependencies.DEPENDENCY_FAILED:
                _check_finished(member.id, member, timeout)
        _check_finished(job_id, record, timeout)
        raise JobFailed(f"Job {job_id} ended {record.state}", job_id=job_id, state=record.state)

    def kill(self) -> None:
        """Kill every member that has not finished (see ``SkunkQueue.kill``)."""
        self.queue.kill(self)
