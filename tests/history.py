"""A Jepsen-style history of a test run, written outside the queue, and the checker that reads it.

Every process of a run (the test's producers, the workers' jobs, the test itself
when it kills something) appends one JSON object per line to the same file.
Each line is one ``write()`` on an ``O_APPEND`` file, so lines from several
processes never interleave; times are ``time.time()`` on the one host the
whole run shares.

Events (``op``):

- ``invoke``: a producer is about to fire the job it calls ``token`` (``due``:
  the epoch it asked for, if any). Then either ``ok`` (acknowledged, with the
  job's ``id``) or ``fail`` (the fire raised: it may or may not have been
  written, so it may or may not run).
- ``start`` / ``end``: an attempt of a job began / stopped, written by the job
  itself with its ``id``, ``attempt``, fencing ``fence`` token and ``pid``; an
  ``end`` whose ``outcome`` is not ``ok`` (interrupted: lease lost, killed) stopped
  the attempt without completing the job;
  optionally ``slot`` and ``schedule`` (a periodic job) and ``parents`` (a
  workflow step: the ids it waited for).
- ``kill``: ``kill(id)`` returned at ``t``: no attempt of ``id`` may start after it, but for the
  one already claimed when ``kill`` returned ``running`` (its fencing token is the event's
  ``fence``: that attempt's job may begin a moment later, and is then interrupted);
  ``kill-fail``: it raised (the job may or may not have been killed). Either way
  the job is not counted lost or unfinished.
- ``crash``: the test SIGKILLed process ``pid`` at ``t``: its unfinished attempt
  stopped running then. An attempt with no ``end`` and no ``crash`` is taken to
  run until the end of the history (it may still be running).

:func:`check` reports each violation by kind (see :data:`KINDS`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

# Each kind of violation the checker reports, and what it means.
KINDS = {
    "lost": "acknowledged by fire, never started",
    "unfinished": "acknowledged and started, but no attempt ever completed",
    "concurrent": "two attempts of one job running at the same time (fencing broken)",
    "same-fence": "two attempts of one job given the same fencing token",
    "after-kill": "an attempt started after kill() had returned",
    "early": "an attempt started before the time the job was fired for",
    "slot-twice": "one periodic slot fired as more than one job",
    "slot-skipped": "a periodic slot inside the checked window never fired",
    "before-parent": "a workflow step started before one of its parents had returned",
}


class History:
    """Appends events to ``path``; safe to share between threads and processes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        Path(self.path).touch()

    def write(self, op: str, **fields: Any) -> None:
        append_event(self.path, op, **fields)

    def invoke(self, token: str, due: float | None = None) -> None:
        self.write("invoke", token=token, **({"due": due} if due is not None else {}))

    def ok(self, token: str, job_id: str) -> None:
        self.write("ok", token=token, id=job_id)

    def fail(self, token: str, error: BaseException | str) -> None:
        self.write("fail", token=token, error=str(error)[:200])

    def kill(self, job_id: str, state: str | None, fence: int | None = None) -> None:
        self.write("kill", id=job_id, state=state, **({"fence": fence} if fence is not None else {}))

    def crash(self, pid: int) -> None:
        self.write("crash", pid=pid)

    def events(self) -> list[dict[str, Any]]:
        return load(self.path)


def append_event(path: str, op: str, **fields: Any) -> None:
    line = json.dumps({"op": op, "t": fields.pop("t", None) or time.time(), **fields}, separators=(",", ":"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def load(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The events in ``path``; a last line cut short (its writer SIGKILLed mid-write) is left out."""
    events = []
    with open(path) as fh:
        for line in fh:
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


@dataclass
class Attempt:
    id: str
    token: str | None
    attempt: int | None
    fence: int | None
    pid: int | None
    start: float
    end: float | None = None   # when it stopped (returned or was interrupted), or None
    completed: bool = False    # it returned
    stop: float = math.inf     # when it stopped running: its end, its process's crash, or never

    def describe(self) -> str:
        end = "open" if self.end is None else f"{self.end:.3f}"
        return f"attempt {self.attempt} (fence {self.fence}, pid {self.pid}, {self.start:.3f}-{end})"


@dataclass
class Report:
    """What :func:`check` found: violations by kind, and counts of what the history holds."""

    violations: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    fired: int = 0
    acknowledged: int = 0
    refused: int = 0           # fire raised: not acknowledged
    refused_but_ran: int = 0   # ... and ran all the same (allowed: the write may have landed)
    jobs_started: int = 0
    attempts: int = 0
    reruns: int = 0            # jobs started more than once, one after another (at-least-once)

    @property
    def ok(self) -> bool:
        return not any(self.violations.values())

    def count(self, kind: str) -> int:
        return len(self.violations.get(kind, []))

    def summary(self) -> str:
        found = ", ".join(f"{kind} {len(items)}" for kind, items in self.violations.items() if items) or "none"
        return (f"{self.fired} fired, {self.acknowledged} acknowledged, {self.refused} refused "
                f"({self.refused_but_ran} of them ran), {self.jobs_started} jobs started in {self.attempts} "
                f"attempts, {self.reruns} run again after an earlier attempt; violations: {found}")

    def explain(self, per_kind: int = 5) -> str:
        lines = [self.summary()]
        for kind, items in self.violations.items():
            for item in items[:per_kind]:
                lines.append(f"  {kind}: {item}")
            if len(items) > per_kind:
                lines.append(f"  {kind}: ... and {len(items) - per_kind} more")
        return "\n".join(lines)


@dataclass(frozen=True)
class Schedule:
    """A periodic schedule to check: a slot every ``every`` seconds, all of ``[start, stop)`` expected."""

    every: float
    start: float
    stop: float


def check(events: Iterable[Mapping[str, Any]], *, drained: bool = True, early_slack: float = 0.05,
          schedules: Mapping[str, Schedule] | None = None) -> Report:
    """Check a history; ``drained``: the run waited for every acknowledged job to finish.

    ``early_slack`` forgives a start that far (seconds) before its due time: the store's
    clock and this host's are read at different instants. ``schedules``: the periodic
    schedules whose every slot in a window must fire exactly once.
    """
    report = Report()
    events = sorted(events, key=lambda e: float(e["t"]))
    last_t = float(events[-1]["t"]) if events else 0.0
    invoked: dict[str, dict[str, Any]] = {}
    acked: dict[str, str] = {}        # token -> id
    refused: set[str] = set()
    crashes: dict[int, float] = {}
    kills: dict[str, tuple[float, int | None]] = {}   # id -> when kill() returned, the claimed attempt's fence
    kill_tried: set[str] = set()
    attempts: dict[str, list[Attempt]] = defaultdict(list)
    open_attempts: dict[tuple[str, int | None, int | None], Attempt] = {}
    for event in events:
        op, t = event["op"], float(event["t"])
        if op == "invoke":
            invoked[event["token"]] = dict(event)
        elif op == "ok":
            acked[event["token"]] = event["id"]
        elif op == "fail":
            refused.add(event["token"])
        elif op == "kill":
            kills.setdefault(event["id"], (t, event.get("fence") if event.get("state") == "running" else None))
            kill_tried.add(event["id"])
        elif op == "kill-fail":
            kill_tried.add(event["id"])
        elif op == "crash":
            crashes.setdefault(int(event["pid"]), t)
        elif op == "start":
            run = Attempt(id=event["id"], token=event.get("token"), attempt=event.get("attempt"),
                          fence=event.get("fence"), pid=event.get("pid"), start=t)
            attempts[run.id].append(run)
            open_attempts[(run.id, run.fence, run.pid)] = run
            _check_start(report, event, run, invoked, kills, early_slack)
        elif op == "end":
            run_or_none = open_attempts.pop((event["id"], event.get("fence"), event.get("pid")), None)
            if run_or_none is not None:
                run_or_none.end = run_or_none.stop = t
                run_or_none.completed = event.get("outcome", "ok") == "ok"
    for run in open_attempts.values():
        if run.pid is not None and run.pid in crashes and crashes[run.pid] >= run.start:
            run.stop = crashes[run.pid]
        elif not drained:
            run.stop = max(last_t, run.start)
    report.fired = len(invoked)
    report.acknowledged = len(acked)
    report.refused = len(refused - set(acked))
    tokens_run = {run.token for runs in attempts.values() for run in runs}
    report.refused_but_ran = len((refused - set(acked)) & tokens_run)
    report.jobs_started = len(attempts)
    report.attempts = sum(len(runs) for runs in attempts.values())
    report.reruns = sum(1 for runs in attempts.values() if len(runs) > 1)
    for token, job_id in acked.items():
        if job_id in kill_tried:
            continue  # killed: never running, or stopping short, is what it was asked to do
        runs = attempts.get(job_id, [])
        if not runs:
            report.violations["lost"].append(f"{token} (id {job_id}) acknowledged, never started")
        elif drained and not any(run.completed for run in runs):
            report.violations["unfinished"].append(f"{token} (id {job_id}): {len(runs)} attempt(s), none completed")
    for job_id, runs in attempts.items():
        _check_overlaps(report, job_id, runs)
    _check_parents(report, events, attempts)
    _check_slots(report, attempts, schedules or {})
    return report


def _check_start(report: Report, event: Mapping[str, Any], run: Attempt, invoked: Mapping[str, Mapping[str, Any]],
                 kills: Mapping[str, tuple[float, int | None]], early_slack: float) -> None:
    killed_at, claimed = kills.get(run.id, (None, None))
    already_claimed = claimed is not None and run.fence is not None and run.fence <= claimed
    if killed_at is not None and run.start > killed_at and not already_claimed:
        report.violations["after-kill"].append(
            f"{run.id}: {run.describe()} started {run.start - killed_at:.3f} s after kill() returned")
    due = event.get("due")
    if due is None and run.token is not None:
        due = invoked.get(run.token, {}).get("due")
    if due is not None and run.start < float(due) - early_slack:
        report.violations["early"].append(f"{run.id}: {run.describe()} started {float(due) - run.start:.3f} s "
                                          f"before it was due")


def _check_overlaps(report: Report, job_id: str, runs: Sequence[Attempt]) -> None:
    ordered = sorted(runs, key=lambda r: r.start)
    fences: dict[int, Attempt] = {}
    for run in ordered:
        if run.fence is not None:
            earlier = fences.get(run.fence)
            if earlier is not None:
                report.violations["same-fence"].append(f"{job_id}: {earlier.describe()} and {run.describe()}")
            fences[run.fence] = run
    for i, first in enumerate(ordered):
        for second in ordered[i + 1:]:
            if second.start < first.stop:
                report.violations["concurrent"].append(
                    f"{job_id}: {second.describe()} started while {first.describe()} was still running")


def _check_parents(report: Report, events: Sequence[Mapping[str, Any]],
                   attempts: Mapping[str, Sequence[Attempt]]) -> None:
    ends: dict[str, float] = {}
    for event in events:
        if event["op"] == "end":
            ends.setdefault(event["id"], float(event["t"]))
    for event in events:
        if event["op"] != "start" or not event.get("parents"):
            continue
        t = float(event["t"])
        for parent in event["parents"]:
            ended = ends.get(parent)
            if ended is None or ended > t:
                when = "never returned" if ended is None else f"returned {ended - t:.3f} s later"
                report.violations["before-parent"].append(f"{event['id']} started at {t:.3f}; parent {parent} {when}")


def _check_slots(report: Report, attempts: Mapping[str, Sequence[Attempt]], schedules: Mapping[str, Schedule]) -> None:
    slots: dict[str, dict[float, set[str]]] = defaultdict(lambda: defaultdict(set))
    for job_id, runs in attempts.items():
        for run in runs:
            if run.token and run.token.startswith("slot:"):
                _, schedule, moment = run.token.split(":", 2)
                slots[schedule][round(float(moment), 3)].add(job_id)
    for schedule, by_slot in slots.items():
        for at, ids in sorted(by_slot.items()):
            if len(ids) > 1:
                report.violations["slot-twice"].append(f"{schedule} slot {at:.3f} fired as {len(ids)} jobs: "
                                                       f"{sorted(ids)}")
    for schedule, window in schedules.items():
        fired = slots.get(schedule, {})
        k = math.ceil(window.start / window.every - 1e-9)
        while k * window.every < window.stop:
            expected = round(k * window.every, 3)
            if expected not in fired:
                report.violations["slot-skipped"].append(f"{schedule} slot {expected:.3f} never fired")
            k += 1


def slot_token(schedule: str, slot: float) -> str:
    """The token a periodic job's start carries: its schedule and its slot (epoch seconds)."""
    return f"slot:{schedule}:{slot:.3f}"
