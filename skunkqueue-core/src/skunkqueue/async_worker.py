"""A worker that runs ``async def`` jobs concurrently on its event loop (``--async-concurrency N``).

Each async job is its own task, with its own claim, lease, fencing token and
outcome; the pool renews, times and kills them one by one as it does for sync
jobs (see :mod:`skunkqueue.pool`). Stopping one means cancelling its task:
a kill request or a lost lease cancels that task only; a time limit cancels
it and records ``TimeoutError``; a rough stop cancels them all (``killed``);
a gentle stop lets the running ones finish and takes no more. A task that
blocks the loop cannot stop its lease from being renewed (the pool renews
it), and one that never yields is ended by the pool killing the worker after
``--grace``: the jobs running in it are then recorded (the one past its time
limit as ``TimeoutError``, the others as ``WorkerDied``, handed out again).

Sync jobs that reach such a worker run one at a time on the loop's thread,
which pauses the async jobs meanwhile: give them routes of their own.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any

from skunkqueue import channel, flow, hooks
from skunkqueue.context import JobContext
from skunkqueue.context import _current as _current_job
from skunkqueue.errors import BackendUnavailable, JobKilled, RoughStop
from skunkqueue.record import JobRecord, Outcome
from skunkqueue.worker import POOL_SILENT_PAUSE, Worker, interrupt_for

log = logging.getLogger("skunkqueue.worker")


class AsyncWorker(Worker):
    """A :class:`~skunkqueue.worker.Worker` whose main loop is an asyncio event loop."""

    # The loop claims for its free slots itself; a claim made while recording
    # one task's outcome would hold jobs no slot is free for.
    claims_on_finish = False
    claims_on_wake = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loop_ref: asyncio.AbstractEventLoop | None = None
        self._tasks: dict[str, tuple[asyncio.Task[None], JobRecord]] = {}
        self._task_interrupts: dict[str, JobKilled] = {}

    # -- stopping tasks (signal handlers hand the work to the loop) ---------------

    def _stop_task(self, job_id: str, reason: channel.Reason) -> None:
        if self._loop_ref is not None:
            self._loop_ref.call_soon_threadsafe(self._cancel, job_id, reason, None)

    def _stop_tasks(self, why: JobKilled) -> None:
        if self._loop_ref is not None:
            self._loop_ref.call_soon_threadsafe(self._cancel_all, why)

    def _busy(self) -> bool:
        return bool(self._tasks) or self.current is not None

    def _cancel(self, job_id: str, reason: channel.Reason | None, why: JobKilled | None) -> None:
        entry = self._tasks.get(job_id)
        if entry is None or job_id in self._task_interrupts:
            return
        task, record = entry
        self._task_interrupts[job_id] = why or interrupt_for(reason or channel.Reason.KILL, record)
        task.cancel()

    def _cancel_all(self, why: JobKilled) -> None:
        for job_id in list(self._tasks):
            self._cancel(job_id, None, why)

    # -- the loop -----------------------------------------------------------------

    def _loop(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop_ref = asyncio.get_running_loop()
        backend, slots = self.backend, self.config.async_concurrency
        pause = 0.001
        busy_at = time.monotonic()  # when a job last ran: the store's idle back-off grows from there
        while self.stopping is None:
            try:
                self._read_commands()  # a stop the pool also sends through the pipe (its signal may be lost)
                channel.log_unreadable(self.pool.unreadable, f"worker {self.id}")
                if self.stopping is not None:
                    break
                free = slots - len(self._tasks)
                if free > 0 and not self.held and self.may_claim():
                    self._took(backend.claim(self.config.route, self.id, self.config.lease, free))
                    if self.config.burst and not self.held and not self._tasks \
                            and not flow.burst_waits(backend, self.config.route, self.id):
                        self.stopping = "drained"  # nothing due or held back by a limit, none running: --burst is done
                        break
                took_up = False
                while self.held and len(self._tasks) < slots and self.stopping is None:
                    self._take_up(self.held.pop(0))
                    took_up = True
                if took_up:
                    pause = 0.001
                    await asyncio.sleep(0)
                elif self._tasks:
                    # Jobs run on this loop, so it cannot block in wait_for_work: poll the store.
                    await asyncio.wait([t for t, _ in self._tasks.values()], timeout=pause,
                                       return_when=asyncio.FIRST_COMPLETED)
                    pause = min(pause * 2, backend.max_idle_poll)
                    busy_at = time.monotonic()
                elif not self.may_claim():  # the pool is silent: claim nothing it could not renew
                    await asyncio.sleep(POOL_SILENT_PAUSE)
                else:  # nothing runs: block on the store
                    backend.wait_for_work(self.config.route, self.id, 1.0, time.monotonic() - busy_at)
            except BackendUnavailable as exc:
                log.warning("worker %s: %s; retrying in 1 s", self.id, exc)
                await asyncio.sleep(1.0)
        log.info("worker %s: stopping (%s); %d async job(s) running", self.id, self.stopping, len(self._tasks))
        if self.stopping == channel.StopMode.ROUGH:
            self._cancel_all(RoughStop("worker stopped roughly (SIGINT)"))
        while self._tasks:
            await asyncio.wait([t for t, _ in self._tasks.values()])

    def execute(self, record: JobRecord) -> None:
        """Start an async job as a task; run a sync one right here (blocking the loop).

        The attempt is the sync worker's (prepared once, recorded by the same
        steps): only the running of an async job's code differs.
        """
        started = time.monotonic()
        prepared = self._begin(record)
        if isinstance(prepared, Outcome) or not inspect.iscoroutinefunction(prepared[0].func):
            self._attempt(record, prepared, started)
            return
        job, args, kwargs = prepared
        task = asyncio.get_running_loop().create_task(self._run_task(record, job.func, args, kwargs, started))
        self._tasks[record.id] = (task, record)
        # Async jobs are tasks, not "the current job"; an interrupt that came
        # while it was being taken up stops the task before its first step.
        early, self.current, self._interrupted = self._interrupted, None, None
        if early is not None:
            self._task_interrupts[record.id] = early
            task.cancel()

    async def _run_task(self, record: JobRecord, func: Any, args: list[Any], kwargs: dict[str, Any],
                        started: float) -> None:
        try:
            hooks.call("job_started", record=record)
            # This task's own copy of the context.
            _current_job.set(JobContext.of(record, time.time(), self._dependencies.pop(record.id, None)))
            value: Any = None
            raised: BaseException | None = None
            try:
                value = await func(*args, **kwargs)
            except BaseException as exc:  # CancelledError included: the interrupt below says why
                raised = exc
            why = self._task_interrupts.pop(record.id, None)
            if why is None and isinstance(raised, asyncio.CancelledError):
                why = JobKilled("cancelled")
            self._conclude(record, self._outcome(record, value, raised, why), started)
        finally:
            self._tasks.pop(record.id, None)
