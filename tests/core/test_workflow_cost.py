"""What a workflow step costs per parent: a chord's callback has one parent per member (10,000)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from skunkqueue import SkunkQueue, dependencies
from skunkqueue.record import PENDING, JobRecord, new_id


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
