"""Workflows: chains, groups, chords and ``fire(after=...)`` (see ``skunkqueue.workflow``).

The protocol half drives the store directly: a dependent is claimable only
after all its parents finished, exactly once, whatever finishes are replayed
or fenced off. The lifecycle half runs real pools, counting executions in an
append-only file outside the queue.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from skunkqueue import dependencies, policy
from skunkqueue.errors import ConfigurationError, JobFailed
from skunkqueue.persistence import Persistence
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import COMPLETE, ERROR, KILLED, PENDING, RUNNING, JobRecord, Outcome
from skunkqueue.testing import jobs
from skunkqueue.testing.kit import BackendUnderTest
from skunkqueue.testing.suite_support import declare, make_record, started, wait_until
from skunkqueue.testing.workers import PoolProcess
from skunkqueue.workflow import WorkflowHandle, chain, group

# Members of the large group (the figure) and how long the kit gives it.
LARGE_GROUP = 10_000
LARGE_GROUP_TIMEOUT = 600.0
# Dependents of one step (chain(a, group(...))): more than the fdb backend counts down in one
# transaction, more than its stand-in read one at a time in five seconds (it timed out from 3,000).
LARGE_FANOUT = 2_500
# Leases of the pools a test SIGKILLs: short, so that the jobs they held come back soon.
SHORT_LEASE = 2.0


def _needs_workflows(store: Persistence) -> None:
    if not store.supports_workflows:
        pytest.skip(f"the {store.name} backend does not count dependents down (supports_workflows = False)")


def _waiting(queue: str, *parents: str, on_failure: str | None = None) -> Any:
    return make_record(queue, parents=list(parents), due=dependencies.WAITING_DUE, on_failure=on_failure)


def _claim_all(store: Persistence) -> list[str]:
    return [r.id for r in store.claim("r", "w", 30, limit=100)]


def _complete(store: Persistence, job_id: str, value: bytes = b"1") -> None:
    record = store.get(job_id)
    assert record is not None
    assert store.finish(job_id, record.token, policy.completed(value))


def _first_of_two_parents_done(store: Persistence, queue_name: str) -> tuple[JobRecord, JobRecord, JobRecord]:
    """Parents a and b and their dependent c stored together; a and b claimed, a completed."""
    a, b = make_record(queue_name), make_record(queue_name)
    c = _waiting(queue_name, a.id, b.id)
    store.enqueue([a, b, c])
    assert sorted(_claim_all(store)) == sorted([a.id, b.id])
    _complete(store, a.id)
    return a, b, c


class WorkflowSuite:
    """Mixed into :class:`~skunkqueue.testing.ConformanceSuite`."""

    # == the protocol, in-process ===================================================

    def test_a_dependent_is_claimable_once_after_all_its_parents(self, store: Persistence, queue_name: str) -> None:
        _needs_workflows(store)
        a, b, c = _first_of_two_parents_done(store, queue_name)
        assert _claim_all(store) == [], "released before its second parent finished"
        waiting = store.get(c.id)
        assert waiting is not None and waiting.state == PENDING and dependencies.waiting(waiting)
        _complete(store, b.id)
        assert _claim_all(store) == [c.id]
        assert _claim_all(store) == []
        assert store.dependents(a.id) in ([], [c.id])

    def test_a_dependent_sent_again_still_waits_only_for_the_parents_left(self, store: Persistence,
                                                                          queue_name: str) -> None:
        """A step's enqueue sent again (its reply was lost) must not attach it anew: counted from
        the start again, it would wait for a parent that finished already, for ever."""
        _needs_workflows(store)
        a, b, c = _first_of_two_parents_done(store, queue_name)
        store.enqueue([c])
        assert _claim_all(store) == []
        _complete(store, b.id)
        assert _claim_all(store) == [c.id], "not released when its last parent finished"
        store.enqueue([c, make_record(queue_name)])  # and again while it runs
        got = store.get(c.id)
        assert got is not None and (got.state, got.token) == (RUNNING, 1)
        assert len(_claim_all(store)) == 1 and _claim_all(store) == []

    def test_a_workflow_batch_sent_again_whole_runs_each_step_once(self, store: Persistence,
                                                                     queue_name: str) -> None:
        """The producer's whole batch (parents and step) sent again at every stage: while a parent
        runs, once both finished and the step waits to be claimed, while it runs, once it finished."""
        _needs_workflows(store)
        a, b = make_record(queue_name), make_record(queue_name)
        c = _waiting(queue_name, a.id, b.id)
        batch = [a, b, c]
        store.enqueue(batch)
        assert sorted(_claim_all(store)) == sorted([a.id, b.id])
        _complete(store, a.id)
        store.enqueue(batch)  # a finished, b running, c waiting for b
        assert _claim_all(store) == []
        _complete(store, b.id)
        store.enqueue(batch)  # both finished: c due, not yet claimed
        got = store.get(c.id)
        assert got is not None and got.state == PENDING and got.due < dependencies.WAITING_DUE
        assert _claim_all(store) == [c.id]
        store.enqueue(batch)
        assert _claim_all(store) == []
        _complete(store, c.id)
        store.enqueue(batch)
        assert _claim_all(store) == []
        assert [store.get(r.id).state for r in batch] == [COMPLETE] * 3  # type: ignore[union-attr]

    def test_a_workflow_batch_half_applied_then_sent_again_runs_each_step_once(self, store: Persistence,
                                                                                queue_name: str) -> None:
        """The first send stored only the first parent (a store without multi-record atomicity, cut
        part-way); it ran and finished before the whole batch was sent again. The step is new then:
        attached with one parent finished already and one still to come, and it runs once."""
        _needs_workflows(store)
        a, b = make_record(queue_name), make_record(queue_name)
        c = _waiting(queue_name, a.id, b.id)
        store.enqueue([a])
        assert _claim_all(store) == [a.id]
        _complete(store, a.id)
        store.enqueue([a, b, c])
        assert _claim_all(store) == [b.id]
        assert store.get(a.id).state == COMPLETE  # type: ignore[union-attr]
        store.enqueue([a, b, c])
        _complete(store, b.id)
        assert _claim_all(store) == [c.id]
        store.enqueue([a, b, c])
        assert _claim_all(store) == []

    def test_a_step_sent_again_after_its_parents_were_deleted_does_not_wait_for_ever(
            self, backend: BackendUnderTest, queue_name: str) -> None:
        """Step, parents and all expired and were deleted; the step's resend is stored anew (see
        ``test_an_enqueue_sent_again_after_its_record_expired_is_stored_anew``). Its parents are
        gone, which counts as not completed: it must settle, not wait at WAITING_DUE for ever."""
        with backend.open(queue_name, result_ttl=0.5) as store:
            _needs_workflows(store)
            a = make_record(queue_name)
            c = _waiting(queue_name, a.id)
            store.enqueue([a, c])
            _complete(store, _claim_all(store)[0])
            assert _claim_all(store) == [c.id]
            _complete(store, c.id)
            time.sleep(1.5)
            store.delete_expired(store.now())
            assert store.get(a.id) is None and store.get(c.id) is None
            store.enqueue([c])
            got = store.get(c.id)
            assert got is not None
            if got.state == PENDING:
                assert got.due < dependencies.WAITING_DUE, "waits for a parent that is gone, for ever"
            assert got.state in (PENDING, ERROR, KILLED), got.state
            assert len(_claim_all(store)) == (1 if got.state == PENDING else 0)

    def test_a_stale_or_replayed_finish_does_not_count(self, store: Persistence, queue_name: str) -> None:
        _needs_workflows(store)
        a = make_record(queue_name)
        c = _waiting(queue_name, a.id)
        store.enqueue([a, c])
        [first] = store.claim("r", "w1", 30)
        # The lease runs out and the recoverer hands it back; another worker takes it.
        assert store.finish(a.id, first.token, Outcome(PENDING, due=time.time()))
        [second] = store.claim("r", "w2", 30)
        assert second.token > first.token
        assert not store.finish(a.id, first.token, policy.completed(b"1")), "a stale finish applied"
        assert _claim_all(store) == [], "a fenced-off finish released the dependent"
        assert store.finish(a.id, second.token, policy.completed(b"2"))
        assert not store.finish(a.id, second.token, policy.completed(b"2")), "a replayed finish applied"
        assert _claim_all(store) == [c.id]
        assert _claim_all(store) == []

    def test_one_finish_ends_or_releases_thousands_of_dependents_once(self, store: Persistence,
                                                                      queue_name: str) -> None:
        """A fan-out, ``chain(a, group(...))``, whose step fails: the members that run anyway are
        released, each once, the others end killed, however much one of the store's transactions holds."""
        _needs_workflows(store)
        a = make_record(queue_name)
        half = LARGE_FANOUT // 2
        anyway = [_waiting(queue_name, a.id, on_failure="run") for _ in range(half)]
        killed = [_waiting(queue_name, a.id) for _ in range(LARGE_FANOUT - half)]
        store.enqueue([a])
        members = anyway + killed
        for start in range(0, LARGE_FANOUT, 500):
            store.enqueue(members[start:start + 500])
        [claimed] = store.claim("r", "w", 30)
        started = time.monotonic()
        try:
            finished = store.finish(a.id, claimed.token, policy.failed(claimed, {"type": "ValueError",
                                                                                 "message": "x", "traceback": ""}))
        except Exception as exc:  # one line that names the store's error and its time, not a deep traceback
            pytest.fail(f"the finish that ends {LARGE_FANOUT} dependents raised {type(exc).__name__} after "
                        f"{time.monotonic() - started:.1f} s: {exc}", pytrace=False)
        assert finished
        released: list[str] = []
        while batch := _claim_all(store):
            released += batch
        assert len(released) == half and set(released) == {m.id for m in anyway}
        assert store.counts() == {("r", ERROR): 1, ("r", RUNNING): half, ("r", KILLED): LARGE_FANOUT - half}
        ended = store.get(killed[-1].id)
        assert ended is not None and ended.error is not None and ended.error["message"] == f"{a.id} ended error"

    def test_a_failed_parent_ends_its_dependents_killed_down_the_line(self, store: Persistence,
                                                                      queue_name: str) -> None:
        _needs_workflows(store)
        a = make_record(queue_name)
        b = _waiting(queue_name, a.id)
        c = _waiting(queue_name, b.id)
        store.enqueue([a, b, c])
        [claimed] = store.claim("r", "w", 30)
        assert store.finish(a.id, claimed.token, policy.failed(claimed, {"type": "ValueError", "message": "x",
                                                                          "traceback": ""}))
        got_b, got_c = store.get(b.id), store.get(c.id)
        assert got_b is not None and got_c is not None
        assert (got_b.state, got_c.state) == (KILLED, KILLED)
        assert got_b.error == {"type": "DependencyFailed", "message": f"{a.id} ended error", "traceback": ""}
        assert got_c.error is not None and got_c.error["message"] == f"{b.id} ended killed"
        assert _claim_all(store) == []

    def test_dependents_ended_together_count_for_a_shared_dependent_once_each(self, store: Persistence,
                                                                              queue_name: str) -> None:
        """a fails; b1 and b2 (a's dependents) end killed by the same finish. Their shared dependents
        count both at once: the one that runs anyway is released once, the one that does not ends
        killed once, and one still waiting for another parent stays waiting."""
        _needs_workflows(store)
        a, other = make_record(queue_name), make_record(queue_name)
        b1, b2 = _waiting(queue_name, a.id), _waiting(queue_name, a.id)
        anyway = _waiting(queue_name, b1.id, b2.id, on_failure="run")
        ends = _waiting(queue_name, b1.id, b2.id)
        waits = _waiting(queue_name, b1.id, b2.id, other.id, on_failure="run")
        store.enqueue([a, other, b1, b2, anyway, ends, waits])
        assert sorted(_claim_all(store)) == sorted([a.id, other.id])
        got_a = store.get(a.id)
        assert got_a is not None
        assert store.finish(a.id, got_a.token, policy.failed(got_a, {"type": "ValueError", "message": "x",
                                                                     "traceback": ""}))
        assert _claim_all(store) == [anyway.id]
        got_ends = store.get(ends.id)
        assert got_ends is not None and got_ends.state == KILLED
        assert got_ends.error is not None and got_ends.error["message"] in {f"{b1.id} ended killed",
                                                                            f"{b2.id} ended killed"}
        _complete(store, other.id)
        assert _claim_all(store) == [waits.id]
        assert _claim_all(store) == []

    def test_dependents_ended_together_each_name_their_own_parent(self, store: Persistence,
                                                                   queue_name: str) -> None:
        """a fails and ends b1 and b2; their dependents c1 (of b1) and c2 (of b2) end in the same
        round, each with the error of its own parent, not of the other's."""
        _needs_workflows(store)
        a = make_record(queue_name)
        b1, b2 = _waiting(queue_name, a.id), _waiting(queue_name, a.id)
        c1, c2 = _waiting(queue_name, b1.id), _waiting(queue_name, b2.id)
        store.enqueue([a, b1, b2, c1, c2])
        [claimed] = store.claim("r", "w", 30)
        assert store.finish(a.id, claimed.token, policy.failed(claimed, {"type": "ValueError", "message": "x",
                                                                          "traceback": ""}))
        for child, parent in ((c1, b1), (c2, b2)):
            got = store.get(child.id)
            assert got is not None and got.state == KILLED
            assert got.error == {"type": "DependencyFailed", "message": f"{parent.id} ended killed", "traceback": ""}
        assert _claim_all(store) == []

    def test_on_failure_run_waits_for_every_parent(self, store: Persistence, queue_name: str) -> None:
        _needs_workflows(store)
        a, b = make_record(queue_name), make_record(queue_name)
        c = _waiting(queue_name, a.id, b.id, on_failure="run")
        store.enqueue([a, b, c])
        assert store.finish(a.id, 0, policy.killed("killed before it ran"), expect=PENDING)
        assert _claim_all(store) == [b.id]
        _complete(store, b.id)
        assert _claim_all(store) == [c.id]

    def test_a_dependent_of_finished_or_missing_parents_counts_them_at_once(self, store: Persistence,
                                                                            queue_name: str) -> None:
        _needs_workflows(store)
        a = make_record(queue_name)
        store.enqueue([a])
        assert _claim_all(store) == [a.id]
        _complete(store, a.id)
        c = _waiting(queue_name, a.id)
        store.enqueue([c])
        assert _claim_all(store) == [c.id]
        orphan = _waiting(queue_name, "no-such-parent")
        store.enqueue([orphan])
        got = store.get(orphan.id)
        assert got is not None and got.state == KILLED
        assert got.error is not None and got.error["message"] == "no-such-parent ended killed"

    def test_a_killed_dependent_stays_killed_when_its_parent_completes(self, store: Persistence,
                                                                       queue_name: str) -> None:
        _needs_workflows(store)
        a = make_record(queue_name)
        c = _waiting(queue_name, a.id)
        d = _waiting(queue_name, c.id, on_failure="run")
        store.enqueue([a, c, d])
        assert store.finish(c.id, 0, policy.killed("killed before it ran"), expect=PENDING)
        assert _claim_all(store) == [a.id, d.id]  # d runs anyway: its one parent was killed
        _complete(store, a.id)
        got = store.get(c.id)
        assert got is not None and got.state == KILLED
        assert _claim_all(store) == []

    def test_two_parents_finishing_at_once_release_the_dependent_once(self, backend: BackendUnderTest,
                                                                      store: Persistence, queue_name: str) -> None:
        _needs_workflows(store)
        rounds, released = 20, 0
        stores = [backend.open(queue_name) for _ in range(2)]
        try:
            for _ in range(rounds):
                a, b = make_record(queue_name), make_record(queue_name)
                c = _waiting(queue_name, a.id, b.id)
                store.enqueue([a, b, c])
                claimed = {r.id: r for r in store.claim("r", "w", 30, limit=2)}
                barrier = threading.Barrier(2)

                def finish(own: Persistence, job_id: str, token: int, barrier: threading.Barrier) -> None:
                    barrier.wait()
                    own.finish(job_id, token, policy.completed(b"1"))

                threads = [threading.Thread(target=finish, args=(own, job_id, claimed[job_id].token, barrier))
                           for own, job_id in zip(stores, (a.id, b.id))]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(30)
                got = _claim_all(store)
                assert got == [c.id], f"the dependent was handed out {len(got)} times"
                released += 1
                got_c = store.get(c.id)
                assert got_c is not None and got_c.attempts == 1
                _complete(store, c.id)
        finally:
            for own in stores:
                own.close()
        assert released == rounds

    # == real pools ====================================================================

    @pytest.mark.parametrize("api", ["sync", "async"])
    def test_a_chain_passes_each_result_on(self, queue: SkunkQueue, store: Persistence, api: str,
                                           start_pool: Callable[..., PoolProcess]) -> None:
        _needs_workflows(store)
        add = declare(queue, jobs.add)
        flow = chain(add.s(1, 2), add.s(10), add.s(100))
        start_pool(["r"])
        if api == "sync":
            handle = flow.fire()
            assert handle.wait(timeout=60) == 113
        else:
            async def fire_and_wait() -> tuple[WorkflowHandle, Any]:
                fired = await flow.afire()
                return fired, await fired.aresult(timeout=60)

            handle, value = asyncio.run(fire_and_wait())
            assert value == 113
        assert handle.state == COMPLETE
        assert [h.result for h in handle.jobs] == [3, 13, 113]
        assert len({h.id for h in handle.jobs}) == 3 and all(isinstance(h.id, str) for h in handle.jobs)

    def test_a_signed_workflow_runs(self, queue: SkunkQueue, store: Persistence, tmp_path: Path,
                                    start_pool: Callable[..., PoolProcess], monkeypatch: pytest.MonkeyPatch) -> None:
        """Workflow records are signed as fire signs a job: workers holding SKUNQ_SECRET run them."""
        _needs_workflows(store)
        add = declare(queue, jobs.add)
        monkeypatch.setenv("SKUNQ_SECRET", "workflow-secret-0123456789abcdef")
        start_pool(["r"], env={"SKUNQ_SECRET": "workflow-secret-0123456789abcdef"})
        handle = chain(add.s(1, 2), group(add.s(10), add.s(20))).fire()
        assert handle.wait(timeout=60) == [13, 23]

    def test_groups_and_chains_nest(self, queue: SkunkQueue, store: Persistence,
                                    start_pool: Callable[..., PoolProcess]) -> None:
        _needs_workflows(store)
        add, total = declare(queue, jobs.add), declare(queue, jobs.total)
        start_pool(["r"], concurrency=2)
        # 2 -> [12, 23] -> 135
        nested = chain(add.s(1, 1), group(add.s(10), chain(add.s(20), add.s(1))), total.s(100)).fire()
        members = group(chain(add.s(1, 1), add.s(1)), add.s(5, 5), group(add.s(1, 0), add.s(2, 0))).fire()
        assert nested.wait(timeout=60) == 135
        assert members.wait(timeout=60) == [3, 10, [1, 2]]
        with pytest.raises(ConfigurationError, match="needs at least one"):
            chain(add.s(1, 1), group(), total.s()).fire()

    def test_a_chord_callback_runs_once_when_a_pool_is_killed_mid_group(
            self, queue: SkunkQueue, store: Persistence, start_pool: Callable[..., PoolProcess],
            tmp_path: Path) -> None:
        _needs_workflows(store)
        step, gather = declare(queue, jobs.step), declare(queue, jobs.gather)
        log = tmp_path / "executions"
        tokens = [f"m{i}" for i in range(24)]
        pools = [start_pool(["r"], concurrency=2, lease=SHORT_LEASE, new_session=True) for _ in range(3)]
        handle = group(step.s(None, str(log), token, 0.4) for token in tokens).then(gather.s(str(log))).fire()
        wait_until(lambda: log.exists() and len(log.read_text().split()) >= 6, timeout=60,
                   what="the group's first members to run")
        pools[0].signal_group(signal.SIGKILL)
        pools[0].wait(10)
        assert handle.wait(timeout=180) == tokens
        lines = log.read_text().splitlines()
        assert [line for line in lines if line.startswith("callback")] == [f"callback {len(tokens)}"], lines
        assert lines[-1] == f"callback {len(tokens)}", "the callback ran before a member's (last) run"
        assert set(tokens) <= set(lines[:-1])
        assert handle.state == COMPLETE

    def test_a_failure_kills_what_depends_on_it(self, queue: SkunkQueue, store: Persistence,
                                                start_pool: Callable[..., PoolProcess], tmp_path: Path) -> None:
        _needs_workflows(store)
        fail, step = declare(queue, jobs.fail), declare(queue, jobs.step)
        log = tmp_path / "executions"
        start_pool(["r"])
        handle = chain(fail.s("boom"), step.s(str(log), "b"), group(step.s(str(log), "c"))).fire()
        with pytest.raises(JobFailed) as failed:
            handle.wait(timeout=60)
        first, second, third = handle.jobs
        assert failed.value.job_id == first.id and failed.value.error_type == "ValueError"
        assert (first.state, second.state, third.state) == (ERROR, KILLED, KILLED)
        with pytest.raises(JobFailed, match=f"DependencyFailed: {first.id} ended error"):
            second.wait(timeout=5)
        with pytest.raises(JobFailed, match=f"DependencyFailed: {second.id} ended killed"):
            third.wait(timeout=5)
        assert handle.state == ERROR
        assert not log.exists(), "a step ran after its parent failed"

    def test_after_and_on_failure_run(self, queue: SkunkQueue, store: Persistence,
                                      start_pool: Callable[..., PoolProcess], tmp_path: Path) -> None:
        _needs_workflows(store)
        fail, add = declare(queue, jobs.fail), declare(queue, jobs.add)
        report, step = declare(queue, jobs.report), declare(queue, jobs.step)
        log = tmp_path / "executions"
        bad, good = fail.fire("x"), add.fire(1, 2)
        anyway = report.fire(str(log), after=[bad, good], on_failure="run")
        plain = step.fire(None, str(log), "never", after=[bad])
        fine = step.fire(None, str(log), "after-good", after=[good.id])
        start_pool(["r"])
        assert anyway.wait(timeout=60) == {bad.id: ERROR, good.id: COMPLETE}
        with pytest.raises(JobFailed, match=f"DependencyFailed: {bad.id} ended error"):
            plain.wait(timeout=30)
        assert fine.wait(timeout=30) == "after-good"
        lines = log.read_text().splitlines()
        assert sorted(lines) == sorted([json.dumps({bad.id: ERROR, good.id: COMPLETE}, sort_keys=True),
                                        "after-good"])

    def test_killing_a_workflow_kills_every_unfinished_member(self, queue: SkunkQueue, store: Persistence,
                                                              start_pool: Callable[..., PoolProcess],
                                                              tmp_path: Path) -> None:
        _needs_workflows(store)
        nap, step, gather = declare(queue, jobs.nap), declare(queue, jobs.step), declare(queue, jobs.gather)
        marker, log = tmp_path / "starts", tmp_path / "executions"
        start_pool(["r"])
        handle = chain(nap.s(30, str(marker)),
                       group(step.s(str(log), "x"), step.s(str(log), "y")).then(gather.s(str(log)))).fire()
        wait_until(lambda: started(marker), timeout=30, what="the first step to start")
        queue.kill(handle)
        wait_until(lambda: handle.state == KILLED, timeout=30, what="the workflow to end killed")
        assert [h.state for h in handle.jobs] == [KILLED] * 4
        first = store.get(handle.jobs[0].id)
        assert first is not None and first.error is not None and first.error["message"] == "killed by request"
        time.sleep(1.0)
        assert not log.exists(), "a member of a killed workflow ran"
        with pytest.raises(JobFailed):
            handle.wait(timeout=5)

    # Its own wait is bounded (LARGE_GROUP_TIMEOUT); the suite's 300 s default is not enough for
    # MongoDB's replica set beside three other test processes on two cores (83 s alone, idle).
    @pytest.mark.timeout(LARGE_GROUP_TIMEOUT + 120)
    def test_a_large_group_and_its_callback(self, queue: SkunkQueue, store: Persistence,
                                            start_pool: Callable[..., PoolProcess]) -> None:
        _needs_workflows(store)
        add, total = declare(queue, jobs.add), declare(queue, jobs.total)
        handle = group(add.s(i, 0) for i in range(LARGE_GROUP)).then(total.s()).fire()
        assert len(handle.jobs) == LARGE_GROUP + 1
        start_pool(["r"], concurrency=2)
        assert handle.wait(timeout=LARGE_GROUP_TIMEOUT) == LARGE_GROUP * (LARGE_GROUP - 1) // 2
