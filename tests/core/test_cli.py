"""The ``skunq`` command line: listings and clear errors without tracebacks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from click.testing import CliRunner

from skunkqueue import SkunkQueue
from skunkqueue.cli import STALE_AFTER, main
from skunkqueue.housekeeping import WORKER_TTL
from skunkqueue.testing import BackendUnderTest, jobs
from skunkqueue.testing.workers import PoolProcess
from skunkqueue.worker import Worker, WorkerConfig


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "skunkqueue.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_backends_lists_every_installed_backend_with_its_distribution() -> None:
    result = CliRunner().invoke(main, ["backends"])
    assert result.exit_code == 0
    rows = {line.split()[0]: line.split()[1] for line in result.output.splitlines()}
    assert rows["sqlite"] == "skunkqueue"
    assert rows.get("redis") == "skunkqueue-redis" and rows.get("mongodb") == "skunkqueue-mongo"
    assert rows.get("fdb") == "skunkqueue-fdb" and rows.get("postgres") == "skunkqueue-postgres"


def test_work_with_an_unknown_backend_lists_the_installed_ones() -> None:
    result = run("work", "-q", "q", "-r", "r", "--backend", "nosuch")
    assert result.returncode == 1
    assert "No SkunkQueue backend named 'nosuch'" in result.stderr and "sqlite" in result.stderr
    assert "Traceback" not in result.stderr


def test_work_without_routes_is_a_usage_error() -> None:
    result = run("work", "-q", "q")
    assert result.returncode == 2 and "Name at least one route" in result.stderr


def test_work_against_an_unreachable_server_gives_up_with_the_address_and_no_traceback() -> None:
    started = time.monotonic()
    result = run("work", "-q", "q", "-r", "r", "--backend", "redis",
                 "--url", "redis://user:s3cret@127.0.0.1:1", "--log-level", "ERROR")
    assert result.returncode == 1, result.stderr
    assert "127.0.0.1:1" in result.stderr and "s3cret" not in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60


def test_env_variables_give_defaults(tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = tmp_path / "q.db"
    result = CliRunner().invoke(main, ["status"], env={"SKUNQ_QUEUE": "envq", "SKUNQ_URL": str(db)})
    assert result.exit_code == 0 and "Queue envq has no jobs" in result.output
    assert db.exists()


# -- inspecting jobs and workers ------------------------------------------------------------


def _finished_jobs(tmp_path: Path) -> tuple[SkunkQueue, dict[str, str]]:
    """A queue with one complete, one failed (dead-letter), one killed and one pending job."""
    queue = SkunkQueue("inspect", conn_url=str(tmp_path / "q.db"))
    add = queue.event(routes=["r"])(jobs.add.func)
    fail = queue.event(routes=["r"])(jobs.fail.func)
    ids = {"complete": add.fire(2, 3).id, "error": fail.fire("it broke").id}
    worker = Worker(WorkerConfig(queue="inspect", route="r", url=str(tmp_path / "q.db")))
    worker.backend = worker.config.open()
    for record in worker.backend.claim("r", worker.id, 30, limit=2):
        worker.execute(record)
    worker.backend.close()
    killed = add.fire_at(timedelta(minutes=5), 1, 1)
    queue.kill(killed)
    ids["killed"] = killed.id
    ids["pending"] = queue.event(routes=["s"])(jobs.add.func).fire_at(timedelta(minutes=5), 7, 8).id
    return queue, ids


def test_job_shows_one_job_with_its_traceback_and_as_json(tmp_path: Path) -> None:
    _, ids = _finished_jobs(tmp_path)
    base = ["-q", "inspect", "--url", str(tmp_path / "q.db")]
    done = CliRunner().invoke(main, ["job", ids["complete"], *base])
    assert done.exit_code == 0, done.output
    assert "function:   skunkqueue.testing.jobs:add" in done.output and "state:      complete" in done.output
    assert 'arguments:  {"args": [2, 3], "kwargs": {}}' in done.output and "result:     5" in done.output
    failed = CliRunner().invoke(main, ["job", ids["error"], *base])
    assert "state:      error" in failed.output and "error:      ValueError: it broke" in failed.output
    assert "Traceback (most recent call last)" in failed.output and 'raise ValueError(message)' in failed.output
    data = json.loads(CliRunner().invoke(main, ["job", ids["error"], "--json", *base]).output)
    assert (data["function"], data["state"], data["attempts"], data["dead"]) == (jobs.fail.name, "error", 1, True)
    assert data["error"]["type"] == "ValueError" and data["arguments"] == {"args": ["it broke"], "kwargs": {}}
    assert data["fired"] <= data["started"] <= data["finished"] and data["token"] == 1 and data["owner"] is None
    missing = CliRunner().invoke(main, ["job", "nope", *base])
    assert missing.exit_code == 1 and "No job nope on queue inspect" in missing.output


def test_job_never_unpickles_what_the_store_holds(tmp_path: Path) -> None:
    queue = SkunkQueue("pickled", conn_url=str(tmp_path / "q.db"), serializer="pickle")
    handle = queue.event(routes=["r"])(jobs.add.func).fire(1, 2)
    out = CliRunner().invoke(main, ["job", handle.id, "-q", "pickled", "--url", str(tmp_path / "q.db")]).output
    assert "<pickle," in out and "not decoded>" in out


def test_jobs_lists_and_filters_by_route_and_state(tmp_path: Path) -> None:
    _, ids = _finished_jobs(tmp_path)
    base = ["-q", "inspect", "--url", str(tmp_path / "q.db")]
    listed = CliRunner().invoke(main, ["jobs", *base])
    assert listed.exit_code == 0 and all(job_id in listed.output for job_id in ids.values())
    assert listed.output.splitlines()[0].split() == ["id", "function", "route", "state", "due", "attempts"]
    rows = json.loads(CliRunner().invoke(main, ["jobs", "--json", "--state", "killed", *base]).output)
    assert [(r["id"], r["state"], r["route"]) for r in rows] == [(ids["killed"], "killed", "r")]
    rows = json.loads(CliRunner().invoke(main, ["jobs", "--json", "-r", "s", *base]).output)
    assert [r["id"] for r in rows] == [ids["pending"]] and set(rows[0]) == {
        "id", "function", "route", "state", "due", "attempts", "signature"}
    assert len(json.loads(CliRunner().invoke(main, ["jobs", "--json", "--limit", "2", *base]).output)) == 2
    bad = CliRunner().invoke(main, ["jobs", "--state", "done", *base])
    assert bad.exit_code == 2 and "'done' is not one of" in bad.output
    none = CliRunner().invoke(main, ["jobs", "-r", "nowhere", *base])
    assert none.exit_code == 0 and "No matching jobs" in none.output


def test_retry_of_a_complete_or_killed_job_needs_force(tmp_path: Path) -> None:
    queue, ids = _finished_jobs(tmp_path)
    base = ["-q", "inspect", "--url", str(tmp_path / "q.db")]
    for state in ("complete", "killed"):
        refused = CliRunner().invoke(main, ["retry", ids[state], *base])
        assert refused.exit_code == 1 and f"is {state}" in refused.output and "--force" in refused.output
        record = queue.get(ids[state])
        assert record is not None and record.state == state, "a refused retry changed the job"
        forced = CliRunner().invoke(main, ["retry", ids[state], "--force", *base])
        assert forced.exit_code == 0 and "requeued" in forced.output
        record = queue.get(ids[state])
        assert record is not None and record.state == "pending"
    dead = CliRunner().invoke(main, ["retry", ids["error"], *base])
    assert dead.exit_code == 0 and "requeued" in dead.output
    pending = CliRunner().invoke(main, ["retry", ids["pending"], *base])
    assert pending.exit_code == 1 and "No finished job" in pending.output


def test_workers_marks_a_sigkilled_busy_worker_stale_then_it_drops_out(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    queue = SkunkQueue("stale", conn_url=str(db))
    pool = PoolProcess(BackendUnderTest(name="sqlite", url=str(db)), "stale", ["r"],
                       log_path=tmp_path / "pool.log")
    base = ["workers", "-q", "stale", "--url", str(db)]
    try:
        pool.wait_ready()
        marker = tmp_path / "started"
        queue.event(routes=["r"])(jobs.nap.func).fire(60, str(marker))
        deadline = time.monotonic() + 20
        while "busy" not in CliRunner().invoke(main, base).output and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "state=busy" in CliRunner().invoke(main, base).output
        pool.signal(signal.SIGKILL)  # the worker dies with it, still registered as busy
        pool.wait(10)
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < STALE_AFTER + 2.5:
            time.sleep(0.2)
        out = CliRunner().invoke(main, base).output
        assert "state=stale (" in out and "s since last heartbeat)" in out and "busy" not in out, out
        while time.monotonic() - killed_at < WORKER_TTL + 3:
            time.sleep(0.5)
        assert "No live workers" in CliRunner().invoke(main, base).output
    finally:
        pool.stop()
