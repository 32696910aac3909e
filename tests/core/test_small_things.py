"""Issue 27's small things: errors importable from ``skunkqueue``, an aware ``slot``, the demo's
temporary folder, ``.gitignore``, the README on ``make test``, ``skunq periodic`` by short name and
``python -m skunkqueue.cli periodic``."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

import skunkqueue
from skunkqueue import SkunkQueue, errors, periodic
from skunkqueue.cli import main
from skunkqueue.context import current_job
from skunkqueue.job import Job
from skunkqueue.worker import Worker, WorkerConfig

ROOT = Path(__file__).resolve().parents[2]


def test_every_error_a_user_can_meet_is_importable_from_skunkqueue() -> None:
    raised_to_users = {name for name, cls in inspect.getmembers(errors, inspect.isclass)
                       if issubclass(cls, errors.SkunkQueueError) and cls.__module__ == errors.__name__}
    assert {"InvalidArguments", "JobRefused", "JobNotFound", "MalformedRecord"} <= raised_to_users
    assert raised_to_users <= set(skunkqueue.__all__)
    for name in raised_to_users:
        assert getattr(skunkqueue, name) is getattr(errors, name)
    from skunkqueue import InvalidArguments  # the example

    assert issubclass(InvalidArguments, TypeError)


# Declared at module level, as workers require; the test fires it on a queue of the same name.
@SkunkQueue("slots").periodic(routes=["r"], every=10)
def slot_seen() -> str:
    ctx = current_job()
    assert ctx is not None and ctx.slot is not None
    return f"{ctx.slot.isoformat()} {ctx.slot.tzinfo is not None}"


def test_a_periodic_jobs_slot_is_an_aware_datetime(tmp_path: Path) -> None:
    queue = SkunkQueue("slots", conn_url=str(tmp_path / "q.db"))
    job = slot_seen
    assert job.schedule is not None
    slot = datetime(2026, 11, 28, 10, 0, 0, tzinfo=timezone.utc).timestamp()
    # The job bound to this test's store is declared too (replacing the module's in the weak registry):
    # keep it alive while the worker runs.
    bound = Job(queue, slot_seen.func, ["r"])
    ticker = periodic.Scheduler(queue.persistence, [job.schedule],
                                lambda s, due, key: bound._fire([((), {})], due, [key]))
    assert ticker.tick(slot + 1) == 1
    worker = Worker(WorkerConfig(queue="slots", route="r", url=str(tmp_path / "q.db")))
    worker.backend = worker.config.open()
    for record in worker.backend.claim("r", worker.id, 30, limit=1):
        worker.execute(record)
    worker.backend.close()
    (done,) = queue.jobs(route="r")
    assert done.state == "complete", done.error
    assert queue.handle(done.id).result == "2026-11-28T10:00:00+00:00 True"


def test_make_demo_leaves_nothing_in_the_temporary_folder(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKUNQ_")}
    env.update(TMPDIR=str(scratch), PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "result 9" in done.stdout
    assert list(scratch.iterdir()) == []


def test_gitignore_lists_no_tracked_file() -> None:
    ignored = subprocess.run(["git", "ls-files", "--cached", "--ignored", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert ignored == []


def test_the_readme_says_make_test_installs_chromium() -> None:
    readme = (ROOT / "README.md").read_text()
    try_it = readme[readme.index("## Try it"):readme.index("## Launching jobs")]
    assert "chromium" in try_it.lower()
    assert "chromium" in (ROOT / "scripts" / "ensure-servers").read_text()  # and it does


SCHEDULES = (
    "from skunkqueue import SkunkQueue\n"
    "q = SkunkQueue('short-names')\n"
    "@q.periodic(every=60, routes=['r'])\n"
    "def tick():\n    return 1\n"
    "@q.periodic(every=60, routes=['r'])\n"
    "def report():\n    return 1\n"
    "class Nightly:\n"
    "    @staticmethod\n"
    "    def report():\n        return 2\n"
    "q.periodic(every=3600, routes=['r'])(Nightly.report)\n"
)


@pytest.fixture
def schedules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    (tmp_path / "short_app.py").write_text(SCHEDULES)
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("short_app", None)
    return ["periodic", "-q", "short-names", "--import", "short_app", "--url", str(tmp_path / "q.db")]


def test_skunq_periodic_takes_a_short_name_when_unambiguous(schedules: list[str]) -> None:
    runner = CliRunner()
    paused = runner.invoke(main, [*schedules, "pause", "tick"])
    assert paused.exit_code == 0 and paused.output.strip() == "short_app:tick: paused", paused.output
    assert "paused" in runner.invoke(main, schedules).output.split("short_app:tick")[1].splitlines()[0]
    assert runner.invoke(main, [*schedules, "resume", "short_app:tick"]).output.strip() == "short_app:tick: resumed"
    assert runner.invoke(main, [*schedules, "pause", "Nightly.report"]).exit_code == 0
    ambiguous = runner.invoke(main, [*schedules, "run", "report"])
    assert ambiguous.exit_code == 1
    assert ambiguous.output.strip() == ("Error: report names several periodic jobs: short_app:Nightly.report, "
                                        "short_app:report; give the full name.")
    missing = runner.invoke(main, [*schedules, "run", "nope"])
    assert missing.exit_code == 1 and "No periodic job nope; known: short_app:Nightly.report" in missing.output


def test_python_dash_m_skunkqueue_cli_periodic_works(schedules: list[str], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKUNQ_")}
    done = subprocess.run([sys.executable, "-m", "skunkqueue.cli", *schedules], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    listed = done.stdout.splitlines()
    assert [line.split()[0] for line in listed] == ["short_app:Nightly.report", "short_app:report", "short_app:tick"]
    assert all("routes=r" in line for line in listed), listed


