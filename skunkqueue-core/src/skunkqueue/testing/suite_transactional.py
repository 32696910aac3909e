"""Transactional enqueue: ``fire(..., using=handle)`` stores the job in the application's own transaction.

Mixed into ConformanceSuite. The tests that need a transaction run where the
backend declares ``supports_using`` and its tests give
``BackendUnderTest.transactions`` (an :class:`~skunkqueue.testing.kit.AppTransactions`);
every backend must refuse a handle it cannot use with one ConfigurationError.
Executions are counted outside the queue, in an append-only file.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from skunkqueue.errors import ConfigurationError
from skunkqueue.persistence import Persistence
from skunkqueue.queue import SkunkQueue
from skunkqueue.record import COMPLETE, PENDING, RUNNING, Outcome
from skunkqueue.testing import jobs
from skunkqueue.testing.kit import AppTransactions, BackendUnderTest
from skunkqueue.testing.suite_support import declare, make_record, wait_until
from skunkqueue.workflow import chain, group

# The figures: 8 processes, each committing 500 transactions of a row and a job.
PROCESSES = 8
TRANSACTIONS_EACH = 500
# Every this many transactions a process rolls back instead (neither row nor job may remain).
ROLLBACK_EVERY = 7


def _needs_transactions(store: Persistence, backend: BackendUnderTest) -> AppTransactions:
    if not store.supports_using:
        pytest.skip(f"the {store.name} backend does not store jobs in the application's transactions "
                    f"(supports_using = False)")
    if backend.transactions is None:
        pytest.skip(f"the {store.name} backend's tests give no AppTransactions (BackendUnderTest.transactions)")
    return backend.transactions


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _commit_many(backend: BackendUnderTest, queue_name: str, transactions: AppTransactions, runs: str, me: int,
                 count: int, out: Any) -> None:
    """One application process: ``count`` transactions, each a row and a job fired in it."""
    queue = SkunkQueue(queue_name, backend=backend.name, conn_url=backend.url, dbname=backend.db,
                       **backend.options)
    mark = declare(queue, jobs.mark)
    committed: list[str] = []
    try:
        handle = transactions.open()
    except BaseException as exc:
        out.put(f"process {me} could not open a transaction: {exc!r}")  # fail the test now, not at its timeout
        raise
    try:
        for i in range(count):
            tag = f"p{me}-{i}"
            transactions.begin(handle)
            transactions.add_row(handle, queue_name, tag)
            mark.fire(runs, tag, using=handle)
            if i % ROLLBACK_EVERY == ROLLBACK_EVERY - 1:
                transactions.rollback(handle)
            else:
                transactions.commit(handle)
                committed.append(tag)
    except BaseException as exc:
        out.put(f"process {me} failed after {len(committed)} commits: {exc!r}")
        raise
    else:
        out.put(committed)
    finally:
        transactions.close(handle)
        queue.close()


class TransactionalSuite:
    """Conformance tests of ``using=``; fixtures come from ConformanceSuite."""

    processes = PROCESSES
    transactions_each = TRANSACTIONS_EACH

    def test_a_handle_the_backend_cannot_use_is_one_configuration_error(self, queue: SkunkQueue) -> None:
        add = declare(queue, jobs.add)
        for wrong in (object(), "a connection string", 42):
            with pytest.raises(ConfigurationError) as caught:
                add.fire(1, 2, using=wrong)
            text = str(caught.value)
            assert text and "\n" not in text, repr(text)
            with pytest.raises(ConfigurationError):
                add.fire_many([(1, 2), (3, 4)], using=wrong)
        assert queue.persistence.counts() == {}

    def test_a_record_sent_again_in_a_transaction_is_left_alone(self, store: Persistence, queue_name: str,
                                                                  backend: BackendUnderTest) -> None:
        """An application whose transaction is run again (its commit's reply was lost) fires the
        same records again: one stored and claimed meanwhile must stay as the worker has it, and
        the rest of the batch is stored (see ``JobStore.enqueue``)."""
        app = _needs_transactions(store, backend)
        record, keyed = make_record(queue_name), make_record(queue_name, key="again-in-a-transaction")
        assert store.enqueue_keyed([record, keyed]) == [record.id, keyed.id]
        claimed = {r.id: r for r in store.claim("r", "w1", 30, limit=2)}
        fresh = make_record(queue_name)
        handle = app.open()
        try:
            app.begin(handle)
            assert store.enqueue_in(handle, [record, fresh, keyed]) == [record.id, fresh.id, keyed.id]
            app.commit(handle)
        finally:
            app.close(handle)
        for job_id, first in claimed.items():
            stored = store.get(job_id)
            assert stored is not None and (stored.state, stored.owner, stored.token, stored.attempts) == \
                (RUNNING, "w1", first.token, first.attempts)
        assert [r.id for r in store.claim("r", "w2", 30, limit=5)] == [fresh.id]

    def test_rollback_leaves_no_job_and_commit_exactly_one(self, queue: SkunkQueue, store: Persistence,
                                                           backend: BackendUnderTest) -> None:
        app = _needs_transactions(store, backend)
        add = declare(queue, jobs.add)
        handle = app.open()
        try:
            app.begin(handle)
            app.add_row(handle, queue.name, "rolled-back")
            gone = add.fire(1, 2, using=handle)
            gone_many = add.fire_many([(3, 4), (5, 6)], keys=["k-1", None], using=handle)
            app.rollback(handle)
            assert store.get(gone.id) is None and all(store.get(h.id) is None for h in gone_many)
            assert store.counts() == {} and app.rows(queue.name) == []

            app.begin(handle)
            app.add_row(handle, queue.name, "committed")
            kept = add.fire(1, 2, using=handle)
            kept_many = add.fire_many([(3, 4), (5, 6)], keys=["k-1", None], using=handle)
            again = add.fire(7, 8, key="k-1", using=handle)  # the key is held inside the same transaction
            assert again.id == kept_many[0].id
            # Nobody else sees any of it before the commit.
            assert store.get(kept.id) is None and store.counts() == {}
            app.commit(handle)
        finally:
            app.close(handle)
        assert app.rows(queue.name) == ["committed"]
        assert store.counts() == {("r", PENDING): 3}
        for handle_ in (kept, *kept_many):
            record = store.get(handle_.id)
            assert record is not None and record.state == PENDING
        # The key is held by the committed record for producers outside the transaction too.
        assert add.fire(9, 9, key="k-1").id == kept_many[0].id

    def test_a_worker_never_claims_a_job_of_an_open_transaction(self, queue: SkunkQueue, store: Persistence,
                                                                backend: BackendUnderTest, start_pool: Any,
                                                                tmp_path: Path) -> None:
        app = _needs_transactions(store, backend)
        if store.using_blocks_writers:
            return self._claims_wait_for_the_open_transaction(queue, store, backend, app, start_pool, tmp_path)
        runs = tmp_path / "runs"
        mark = declare(queue, jobs.mark)
        start_pool(["r"])
        handle = app.open()
        try:
            app.begin(handle)
            app.add_row(handle, queue.name, "slow")
            fired = mark.fire(str(runs), "in-transaction", using=handle)
            # A worker polls (and is woken by other work) while the transaction stays open.
            for i in range(5):
                mark.fire(str(runs), f"outside-{i}")
                time.sleep(0.3)
            wait_until(lambda: len(_lines(runs)) >= 5, timeout=20, what="the jobs fired outside the transaction")
            assert "in-transaction" not in _lines(runs)
            assert store.claim("r", "kit-claimer", 10) == []
            app.commit(handle)
            committed = time.monotonic()
        finally:
            app.close(handle)
        wait_until(lambda: "in-transaction" in _lines(runs), timeout=20, what="the committed job to run")
        took = time.monotonic() - committed
        assert _lines(runs).count("in-transaction") == 1
        record = store.get(fired.id)
        assert record is not None and record.state in (COMPLETE, "running")
        # Woken by the commit, not found by a poll a worker happened to make (a poll waits up to a second).
        if store.notifies:
            assert took < 0.9, f"the committed job started {took:.2f} s after the commit"

    def _claims_wait_for_the_open_transaction(self, queue: SkunkQueue, store: Persistence,
                                              backend: BackendUnderTest, app: AppTransactions, start_pool: Any,
                                              tmp_path: Path) -> None:
        """Where the application's transaction holds the only write lock (``using_blocks_writers``), claims
        made while it is open come back empty or wait for it: none comes back with the job before the
        commit, and the running pool runs the job exactly once after it."""
        runs = tmp_path / "runs"
        mark = declare(queue, jobs.mark)
        start_pool(["r"])
        claimer = backend.open(queue.name)
        claimed: list[tuple[float, list[Any]]] = []
        stop = threading.Event()

        def claim_repeatedly() -> None:
            while not stop.is_set():
                records = claimer.claim("r", "kit-claimer", 10)
                claimed.append((time.monotonic(), records))
                for record in records:  # give it back for the pool to run
                    claimer.finish(record.id, record.token, Outcome(state=PENDING, due=0.0))
                time.sleep(0.05)

        handle = app.open()
        thread = threading.Thread(target=claim_repeatedly)
        try:
            app.begin(handle)
            app.add_row(handle, queue.name, "slow")
            fired = mark.fire(str(runs), "in-transaction", using=handle)
            thread.start()
            time.sleep(1.5)  # the pool's workers and these claims all try while the transaction is open
            assert "in-transaction" not in _lines(runs)
            committed = time.monotonic()
            app.commit(handle)
        finally:
            app.close(handle)
            stop.set()
            thread.join(60)
            claimer.close()
        assert claimed, "no claim came back at all"
        early = [records for moment, records in claimed if moment < committed]
        assert all(records == [] for records in early), "a claim returned the job before its transaction committed"
        assert {r.id for moment, records in claimed if moment >= committed for r in records} <= {fired.id}
        wait_until(lambda: "in-transaction" in _lines(runs), timeout=30, what="the committed job to run")
        time.sleep(0.5)
        assert _lines(runs).count("in-transaction") == 1

    def test_a_workflow_in_a_transaction_exists_exactly_if_it_commits(self, queue: SkunkQueue, store: Persistence,
                                                                      backend: BackendUnderTest,
                                                                      start_pool: Any) -> None:
        app = _needs_transactions(store, backend)
        if not store.supports_workflows:
            pytest.skip(f"the {store.name} backend does not support workflows (supports_workflows = False)")
        add, total = declare(queue, jobs.add), declare(queue, jobs.total)
        handle = app.open()
        try:
            app.begin(handle)
            app.add_row(handle, queue.name, "workflow-rolled-back")
            try:
                gone = chain(add.s(1, 2), add.s(10)).fire(using=handle)
            except ConfigurationError as exc:
                app.rollback(handle)
                pytest.skip(f"the {store.name} backend refuses a workflow in a transaction of yours: {exc}")
            app.rollback(handle)
            assert all(store.get(job_id) is None for job_id in gone.ids)
            app.begin(handle)
            app.add_row(handle, queue.name, "workflow-committed")
            kept = group(add.s(1, 2), add.s(3, 4)).then(total.s(100)).fire(using=handle)
            app.commit(handle)
        finally:
            app.close(handle)
        assert all(store.get(job_id) is not None for job_id in kept.ids)
        start_pool(["r"])
        assert kept.wait(timeout=60) == 3 + 7 + 100  # the callback ran after both members, with their results
        assert sorted(app.rows(queue.name)) == ["workflow-committed"]

    def test_a_dependent_of_a_job_fired_in_the_same_transaction(self, queue: SkunkQueue, store: Persistence,
                                                                 backend: BackendUnderTest, start_pool: Any,
                                                                 tmp_path: Path) -> None:
        """``fire(after=[h], using=handle)`` where ``h`` was fired in the same open transaction: the parent
        is found through it (not reported missing), and both exist exactly if it commits."""
        app = _needs_transactions(store, backend)
        if not store.supports_workflows:
            pytest.skip(f"the {store.name} backend does not support workflows (supports_workflows = False)")
        runs = tmp_path / "runs"
        mark = declare(queue, jobs.mark)
        handle = app.open()
        try:
            app.begin(handle)
            gone = mark.fire(str(runs), "gone-parent", using=handle)
            gone_child = mark.fire(str(runs), "gone-child", after=[gone], using=handle)
            app.rollback(handle)
            app.begin(handle)
            parent = mark.fire(str(runs), "parent", using=handle)
            child = mark.fire(str(runs), "child", after=[parent], using=handle)
            app.commit(handle)
        finally:
            app.close(handle)
        assert store.get(gone.id) is None and store.get(gone_child.id) is None
        stored = store.get(child.id)
        assert stored is not None and stored.parents == [parent.id]
        start_pool(["r"])
        assert child.wait(timeout=60) is not None
        assert _lines(runs) == ["parent", "child"]  # once each, the dependent after its parent

    def test_processes_committing_rows_and_jobs_match_one_to_one(self, queue: SkunkQueue, store: Persistence,
                                                                 backend: BackendUnderTest, start_pool: Any,
                                                                 tmp_path: Path) -> None:
        app = _needs_transactions(store, backend)
        runs = tmp_path / "runs"
        start_pool(["r"], concurrency=2)
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        plain = BackendUnderTest(name=backend.name, url=backend.url, db=backend.db, options=backend.options)
        procs = [ctx.Process(target=_commit_many, args=(plain, queue.name, app, str(runs), me,
                                                        self.transactions_each, out))
                 for me in range(self.processes)]
        for proc in procs:
            proc.start()
        reports = [out.get(timeout=600) for _ in procs]
        failed = [report for report in reports if isinstance(report, str)]
        assert not failed, failed[0]
        committed = [tag for report in reports for tag in report]
        for proc in procs:
            proc.join(60)
            assert proc.exitcode == 0
        expected = self.processes * (self.transactions_each - self.transactions_each // ROLLBACK_EVERY)
        assert len(committed) == len(set(committed)) == expected
        assert sorted(app.rows(queue.name)) == sorted(committed)
        wait_until(lambda: len(_lines(runs)) >= len(committed), timeout=600, what="every committed job to run")
        time.sleep(0.5)  # a job run twice would show up now
        ran = _lines(runs)
        assert len(ran) == len(set(ran)) and sorted(ran) == sorted(committed)
        assert store.counts() == {("r", COMPLETE): len(committed)}
