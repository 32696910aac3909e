"""Workflow API misuse gets one clear line, before anything is stored (the kit covers the behaviour)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from skunkqueue import SkunkQueue, chain, group
from skunkqueue.errors import ConfigurationError, InvalidArguments
from skunkqueue.persistence.sqlite import SQLitePersistence
from skunkqueue.testing import jobs


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[SkunkQueue]:
    q = SkunkQueue("wf", conn_url=str(tmp_path / "q.db"))
    yield q
    q.close()


def _nothing_stored(queue: SkunkQueue) -> None:
    assert queue.jobs() == []


def test_a_job_on_several_routes_needs_route_in_a_workflow(queue: SkunkQueue) -> None:
    both = queue.event(routes=["a", "b"])(jobs.add.func)
    with pytest.raises(ConfigurationError, match=r"name one: add.s\(\.\.\., route='a'\)"):
        both.s(1, 2)
    with pytest.raises(ConfigurationError, match="not declared on the route 'c'"):
        both.s(1, 2, route="c")
    handle = chain(both.s(1, 2, route="b")).fire()
    assert [h.routes for h in handle.jobs] == [["b"]]


def test_arguments_are_checked_with_the_piped_result_first(queue: SkunkQueue) -> None:
    add = queue.event(routes=["r"])(jobs.add.func)
    with pytest.raises(InvalidArguments, match="add"):
        chain(add.s(1, 2), add.s(1, 2)).fire()  # the second step would get three arguments
    with pytest.raises(InvalidArguments):
        group(add.s(1)).fire()
    _nothing_stored(queue)


def test_bad_after_and_on_failure_are_refused(queue: SkunkQueue) -> None:
    add = queue.event(routes=["r"])(jobs.add.func)
    with pytest.raises(ConfigurationError, match="no job nope in the queue 'wf'"):
        add.fire(1, 2, after=["nope"])
    parent = add.fire(1, 2)
    with pytest.raises(ConfigurationError, match="on_failure takes 'kill' or 'run', not 'ignore'"):
        add.fire(1, 2, after=[parent], on_failure="ignore")
    with pytest.raises(ConfigurationError, match="after= takes a list"):
        add.fire(1, 2, after=parent)  # type: ignore[arg-type]
    other = SkunkQueue("other", conn_url=queue.conn_url)
    elsewhere = other.event(routes=["r"])(jobs.add.func)
    with pytest.raises(ConfigurationError, match="dependencies stay within one queue"):
        elsewhere.fire(1, 2, after=[parent])
    with pytest.raises(ConfigurationError, match="declared on one queue"):
        chain(add.s(1, 2), elsewhere.s(1)).fire()
    other.close()
    assert [r.id for r in queue.jobs()] == [parent.id]


def test_steps_must_be_signatures(queue: SkunkQueue) -> None:
    add = queue.event(routes=["r"])(jobs.add.func)
    with pytest.raises(ConfigurationError, match="must be job.s"):
        chain(add.s(1, 2), add)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="at least one step"):
        chain()


def test_a_backend_without_workflows_refuses_them_in_one_line(queue: SkunkQueue,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    add = queue.event(routes=["r"])(jobs.add.func)
    monkeypatch.setattr(SQLitePersistence, "supports_workflows", False)
    with pytest.raises(ConfigurationError) as refused:
        chain(add.s(1, 2), add.s(3)).fire()
    assert "\n" not in str(refused.value) and "does not support workflows" in str(refused.value)
    parent = add.fire(1, 2)
    with pytest.raises(ConfigurationError, match="does not support workflows"):
        add.fire(1, 2, after=[parent])
    assert [r.id for r in queue.jobs()] == [parent.id]


def test_a_workflow_key_fires_the_workflow_once(queue: SkunkQueue) -> None:
    add = queue.event(routes=["r"])(jobs.add.func)
    first = chain(add.s(1, 2), add.s(3)).fire(key="nightly-7")
    again = chain(add.s(1, 2), add.s(3)).fire(key="nightly-7")
    assert again.id == first.id and [h.id for h in again.jobs] == [h.id for h in first.jobs]
    assert len(queue.jobs()) == 2
    stored = queue.get(first.jobs[1].id)
    assert stored is not None and stored.parents == [first.jobs[0].id] and stored.workflow == first.id


def test_skunq_job_shows_parents_and_dependents(queue: SkunkQueue, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from skunkqueue.cli import main

    add = queue.event(routes=["r"])(jobs.add.func)
    handle = chain(add.s(1, 2), add.s(3)).fire()
    first, second = (h.id for h in handle.jobs)
    base = ["-q", "wf", "--url", str(tmp_path / "q.db")]
    shown = CliRunner().invoke(main, ["job", second, *base])
    assert shown.exit_code == 0, shown.output
    assert f"parents:    {first}" in shown.output and f"workflow:   {handle.id}" in shown.output
    assert "due:        when its parents have finished" in shown.output
    parent = CliRunner().invoke(main, ["job", first, *base, "--json"])
    assert parent.exit_code == 0, parent.output
    assert '"dependents": [\n    "' + second + '"\n  ]' in parent.output
