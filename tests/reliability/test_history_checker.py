"""The history checker (tests/history.py) fed good and bad histories: each violation must be reported.

No server, no pool: hand-written histories, then one written by real processes
appending at once (the format's promise that lines never interleave).
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import pytest
from history import KINDS, History, Schedule, check, load, slot_token


def ev(op: str, t: float, **fields: Any) -> dict[str, Any]:
    return {"op": op, "t": t, **fields}


def fired(token: str, job_id: str, t: float = 0.0, due: float | None = None) -> list[dict[str, Any]]:
    invoke = ev("invoke", t, token=token, **({"due": due} if due is not None else {}))
    return [invoke, ev("ok", t + 0.01, token=token, id=job_id)]


def ran(job_id: str, token: str, start: float, end: float | None, *, fence: int = 1, pid: int = 100,
        attempt: int = 1, **extra: Any) -> list[dict[str, Any]]:
    common = {"id": job_id, "token": token, "fence": fence, "pid": pid, "attempt": attempt}
    events = [ev("start", start, **common, **extra)]
    if end is not None:
        events.append(ev("end", end, **common))
    return events


def test_a_clean_history_has_no_violation_and_is_counted() -> None:
    events = [*fired("a", "J1", 0), *ran("J1", "a", 1, 2),
              *fired("b", "J2", 0), *ran("J2", "b", 1, 1.5, pid=100), *ran("J2", "b", 3, 4, fence=2, pid=101,
                                                                            attempt=2),
              ev("invoke", 0, token="c"), ev("fail", 0.5, token="c", error="BackendUnavailable"),
              *ran("J3", "c", 1, 2),  # refused, yet written: allowed to run
              ev("invoke", 0, token="d"), ev("fail", 0.5, token="d", error="x")]  # refused, never ran: fine
    report = check(events)
    assert report.ok, report.explain()
    assert (report.fired, report.acknowledged, report.refused, report.refused_but_ran) == (4, 2, 2, 1)
    assert (report.jobs_started, report.attempts, report.reruns) == (3, 4, 1)


def test_an_acknowledged_job_that_never_started_is_lost() -> None:
    report = check([*fired("a", "J1"), *fired("b", "J2"), *ran("J2", "b", 1, 2)])
    assert report.count("lost") == 1 and "J1" in report.violations["lost"][0]
    assert not report.ok


def test_started_but_never_returned_is_unfinished_only_when_the_run_was_drained() -> None:
    events = [*fired("a", "J1"), *ran("J1", "a", 1, None)]
    assert check(events).count("unfinished") == 1
    assert check(events, drained=False).ok


def test_an_interrupted_attempt_stopped_but_did_not_complete() -> None:
    interrupted = [*fired("a", "J1"), ev("start", 1, id="J1", token="a", fence=1, pid=1),
                   ev("end", 2, id="J1", token="a", fence=1, pid=1, outcome="LeaseLost")]
    assert check(interrupted).count("unfinished") == 1
    retried = [*interrupted, *ran("J1", "a", 3, 4, fence=2, pid=2, attempt=2)]
    assert check(retried).ok  # stopped at 2, the retry began at 3: no overlap, and it completed


def test_overlapping_attempts_are_concurrent() -> None:
    events = [*fired("a", "J1"), *ran("J1", "a", 1, 5, pid=1), *ran("J1", "a", 4, 6, fence=2, pid=2, attempt=2)]
    report = check(events)
    assert report.count("concurrent") == 1 and report.count("same-fence") == 0


def test_an_attempt_that_never_returned_runs_on_unless_its_process_crashed() -> None:
    # pid 1 never wrote its end: until the history says it died, it may still be running.
    base = [*fired("a", "J1"), *ran("J1", "a", 1, None, pid=1), *ran("J1", "a", 4, 6, fence=2, pid=2)]
    assert check(base).count("concurrent") == 1
    assert check([*base, ev("crash", 3, pid=1)]).ok
    # A crash noted after the second attempt started does not excuse the overlap.
    assert check([*base, ev("crash", 5, pid=1)]).count("concurrent") == 1


def test_two_attempts_with_one_fencing_token() -> None:
    events = [*fired("a", "J1"), *ran("J1", "a", 1, 2, fence=7, pid=1), *ran("J1", "a", 3, 4, fence=7, pid=2)]
    report = check(events)
    assert report.count("same-fence") == 1 and report.count("concurrent") == 0


def test_a_start_after_kill_returned() -> None:
    events = [*fired("a", "J1"), *ran("J1", "a", 1, 2), ev("kill", 2.5, id="J1", state="running"),
              *ran("J1", "a", 3, 4, fence=2, pid=2)]
    report = check(events)
    assert report.count("after-kill") == 1
    # The attempt that was running when kill() returned is not a violation by itself.
    assert check([*fired("a", "J1"), *ran("J1", "a", 1, 4), ev("kill", 2, id="J1", state="running")]).ok


def test_the_attempt_claimed_when_kill_returned_running_may_begin_after_it() -> None:
    # Claimed (fence 1) before kill(), the job's own first line a moment after: it is then interrupted.
    claimed = [*fired("a", "J1"), ev("kill", 1.0, id="J1", state="running", fence=1),
               *ran("J1", "a", 1.027, 1.5, fence=1)]
    assert check(claimed).ok
    # A later attempt (fence 2) is a violation, and so is any start after kill() said killed.
    assert check([*claimed, *ran("J1", "a", 2, 3, fence=2, pid=2)]).count("after-kill") == 1
    assert check([*fired("a", "J1"), ev("kill", 1.0, id="J1", state="killed", fence=1),
                  *ran("J1", "a", 1.027, 1.5, fence=1)]).count("after-kill") == 1


def test_a_killed_job_is_neither_lost_nor_unfinished() -> None:
    events = [*fired("a", "J1"), ev("kill", 1, id="J1", state="killed"),
              *fired("b", "J2"), *ran("J2", "b", 1, None), ev("kill", 1.5, id="J2", state="running"),
              *fired("c", "J3"), ev("kill-fail", 1, id="J3", error="BackendUnavailable")]
    assert check(events).ok
    # A kill that raised does not make a later start a violation: it may not have happened.
    assert check([*fired("d", "J4"), ev("kill-fail", 1, id="J4"), *ran("J4", "d", 2, 3)]).ok


def test_a_job_started_before_it_was_due() -> None:
    events = [*fired("a", "J1", 0, due=10.0), *ran("J1", "a", 9.0, 9.5),
              *fired("b", "J2", 0, due=10.0), *ran("J2", "b", 9.99, 10.5)]  # within the slack
    report = check(events)
    assert report.count("early") == 1 and "J1" in report.violations["early"][0]


def test_periodic_slots_fired_twice_or_skipped() -> None:
    def tick(job_id: str, slot: float, pid: int = 1) -> list[dict[str, Any]]:
        return ran(job_id, slot_token("tick", slot), slot + 0.1, slot + 0.2, pid=pid, due=slot)

    events = [*tick("P1", 100.0), *tick("P2", 101.0), *tick("P3", 101.0, pid=2), *tick("P5", 103.0)]
    report = check(events, schedules={"tick": Schedule(every=1.0, start=100.0, stop=104.0)})
    assert report.count("slot-twice") == 1 and "101.000" in report.violations["slot-twice"][0]
    assert report.count("slot-skipped") == 1 and "102.000" in report.violations["slot-skipped"][0]
    # A slot's job retried (same id, later attempt) is one slot fired once.
    retried = [*tick("P1", 100.0), *ran("P1", slot_token("tick", 100.0), 100.5, 100.6, fence=2, pid=3)]
    assert check(retried).ok
    # Early, by its slot.
    assert check(ran("P9", slot_token("tick", 200.0), 199.0, 199.1, due=200.0)).count("early") == 1


def test_a_workflow_step_before_its_parent_returned() -> None:
    events = [*ran("A", "a", 1, 3), *ran("B", "b", 4, 5, parents=["A"]),  # fine
              *ran("C", "c", 2, 2.5, pid=2, parents=["A"]),               # A still running
              *ran("D", "d", 6, 7, pid=3, parents=["A", "X"])]            # X never ran
    report = check(events)
    assert report.count("before-parent") == 2
    assert {v.split()[0] for v in report.violations["before-parent"]} == {"C", "D"}


def test_every_kind_is_reported_by_name_in_the_explanation() -> None:
    events = [*fired("a", "J1"),
              *fired("b", "J2", due=50.0), *ran("J2", "b", 1, 5, pid=1), *ran("J2", "b", 2, 3, pid=2),
              ev("kill", 10, id="J2", state="killed"), *ran("J2", "b", 11, 12, fence=3, pid=3),
              *fired("c", "J3"), *ran("J3", "c", 1, None, pid=4)]
    text = check(events).explain()
    for kind in ("lost", "unfinished", "concurrent", "same-fence", "after-kill", "early"):
        assert kind in text and kind in KINDS


def _append_many(path: str, who: int) -> None:
    history = History(path)
    for n in range(300):
        history.invoke(f"{who}-{n}")
        history.ok(f"{who}-{n}", f"id-{who}-{n}-" + "x" * 200)


def test_processes_appending_at_once_never_interleave_lines(tmp_path: Path) -> None:
    path = str(tmp_path / "history.jsonl")
    History(path)
    workers = [multiprocessing.get_context("spawn").Process(target=_append_many, args=(path, i)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert all(w.exitcode == 0 for w in workers)
    assert len(Path(path).read_text().splitlines()) == len(load(path)) == 4 * 600
    report = check(load(path), drained=False)
    assert (report.fired, report.acknowledged) == (1200, 1200) and report.count("lost") == 1200


def test_a_last_line_cut_short_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    History(path).invoke("a")
    with open(path, "a") as fh:
        fh.write('{"op":"ok","t":1')  # its writer killed mid-line
    assert [e["op"] for e in load(path)] == ["invoke"]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_each_kind_has_a_bad_history_above(kind: str) -> None:
    # Keeps this file honest: a kind added to KINDS needs a test that makes the checker report it.
    source = Path(__file__).read_text()
    assert f'"{kind}"' in source.split("def test_each_kind_has")[0]
