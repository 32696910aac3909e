"""What a workflow step costs per parent: a chord's callback has one parent per member (10,000)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from skunkqueue import SkunkQueue, dependencies, group, headers, policy, serializer
from skunkqueue.persistence.sqlite import SQLitePersistence
from skunkqueue.record import COMPLETE, PENDING, JobRecord, Outcome, new_id
from skunkqueue.testing import jobs
from skunkqueue.testing.suite_support import make_record


class CountingList(list):  # type: ignore[type-arg]
    """A list that counts how often it is walked through."""

    walks = 0

    def __iter__(self) -> Iterator[Any]:
        CountingList.walks += 1
        return super().__iter__()


def test_gathering_a_callbacks_inputs_walks_its_parents_a_fixed_number_of_times(tmp_path: Path) -> None:
    # Walking the parents once per parent made a 10,000-member chord's callback start in
    # O(members^2): 10^8 set insertions, 27 s on the loaded 2-core machine.
    queue = SkunkQueue("wf-cost", conn_url=str(tmp_path / "q.db"))
    try:
        ids = [new_id() for _ in range(2_000)]
        parents = CountingList(ids)
        record = JobRecord(id=new_id(), queue="wf-cost", route="r", func="m:f", payload=b"[[], {}]", state=PENDING,
                           parents=parents, inputs=list(ids))
        CountingList.walks = 0
        inputs, states = dependencies.gather(queue.persistence, record)
        assert CountingList.walks <= 3, f"the parents were walked {CountingList.walks} times"
        # None of them exists: each counts as killed and gives None.
        assert inputs == [None] * len(ids)
        assert states == dict.fromkeys(ids, dependencies.missing_parent_state())
    finally:
        queue.close()


def test_waiting_for_a_finished_group_reads_its_members_in_one_batch(tmp_path: Path) -> None:
    # One look per member was a store round trip each: 10,000 of them to read a finished group.
    queue = SkunkQueue("wf-wait", conn_url=str(tmp_path / "q.db"))
    try:
        add = queue.event(routes=["r"])(jobs.add.func)
        handle = group(add.s(i, 1) for i in range(200)).fire()
        backend = queue.persistence
        while claimed := backend.claim("r", "w1", 30.0, limit=50):
            for record in claimed:
                args, _ = serializer.loads_arguments(headers.arguments(record.payload), record.serializer)
                backend.finish(record.id, record.token, Outcome(COMPLETE, result=serializer.dumps(sum(args), "json")))
        looks: list[str] = []
        for name in ("get", "get_many", "wait_finished"):
            method = getattr(backend, name)

            def counted(*args: Any, _method: Any = method, _name: str = name) -> Any:
                looks.append(_name)
                return _method(*args)
            setattr(backend, name, counted)
        assert handle.wait(timeout=10) == [i + 1 for i in range(200)]
        assert looks == ["get_many"]
    finally:
        queue.close()


def _statements_per_member_finish(backend: SQLitePersistence, members: int) -> float:
    group_ = [make_record(backend.queue) for _ in range(members)]
    callback = make_record(backend.queue, parents=[r.id for r in group_], inputs=[r.id for r in group_],
                           due=dependencies.WAITING_DUE)
    backend.enqueue([*group_, callback])
    claimed = backend.claim("r", "w", 30.0, limit=members)
    assert len(claimed) == members
    statements: list[str] = []
    backend._db.set_trace_callback(statements.append)
    try:
        for record in claimed:
            assert backend.finish(record.id, record.token, policy.completed(b"1"))
    finally:
        backend._db.set_trace_callback(None)
    [released] = backend.claim("r", "w", 30.0)
    assert released.id == callback.id
    return len(statements) / members


def test_a_members_finish_costs_the_same_whatever_the_groups_size(tmp_path: Path) -> None:
    # The contract: releasing a dependent is O(1) store work per finished parent.
    backend = SQLitePersistence("wf-finish", url=str(tmp_path / "q.db"))
    try:
        small = _statements_per_member_finish(backend, 20)
        large = _statements_per_member_finish(backend, 400)
        assert large <= small + 0.5, f"{large:.2f} statements per finish at 400 members, {small:.2f} at 20"
    finally:
        backend.close()
