"""The user-facing API on the embedded backend: validation, errors, seed compatibility."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from skunkqueue import SkunkQueue, hookimpl
from skunkqueue.backends import load
from skunkqueue.errors import BackendNotFound, ConfigurationError, PayloadTooLarge
from skunkqueue.hooks import plugin_manager
from skunkqueue.persistence.sqlite import SQLitePersistence
from skunkqueue.record import COMPLETE, ERROR, JobRecord
from skunkqueue.testing import jobs
from skunkqueue.worker import Worker, WorkerConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def queue(tmp_path: Path) -> SkunkQueue:
    return SkunkQueue("api", conn_url=str(tmp_path / "q.db"))


def test_calling_a_job_calls_the_function(queue: SkunkQueue) -> None:
    add = queue.event(routes=["r"])(jobs.add.func)
    assert add(2, 3) == 5 and add.name == "skunkqueue.testing.jobs:add" and add.__name__ == "add"
    assert queue.job(routes=["r"])(jobs.add.func).routes == ["r"]


@pytest.mark.parametrize("routes", [[], "foo", [""], None])
def test_routes_must_be_a_list_of_names(queue: SkunkQueue, routes: object) -> None:
    with pytest.raises(ConfigurationError, match="routes must be a non-empty list"):
        queue.event(routes=routes)(jobs.add.func)  # type: ignore[arg-type]


def test_fire_at_refuses_naive_datetimes_and_other_types(queue: SkunkQueue) -> None:
    add = queue.event(routes=["r"])(jobs.add.func)
    with pytest.raises(ConfigurationError, match="aware datetime"):
        add.fire_at(datetime.now(), 1, 2)
    with pytest.raises(ConfigurationError, match="timedelta"):
        add.fire_at("tomorrow", 1, 2)  # type: ignore[arg-type]
    assert queue.counts() == {}


def test_bad_queue_settings_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="non-empty name"):
        SkunkQueue("")
    with pytest.raises(ConfigurationError, match="'direct' or 'broadcast'"):
        SkunkQueue("q", queue_type="fanout")
    with pytest.raises(ConfigurationError, match="'json'"):
        SkunkQueue("q", serializer="yaml")
    with pytest.raises(BackendNotFound, match="installed: .*sqlite"):
        SkunkQueue("q", backend="nosuch")


def test_missing_first_party_backend_names_its_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    import skunkqueue.backends as registry
    monkeypatch.setattr(registry, "_entry_points", lambda: {})
    with pytest.raises(BackendNotFound, match="pip install skunkqueue-redis"):
        load("redis")


def test_payload_over_the_backend_limit_is_refused_at_fire(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SQLitePersistence, "max_payload", 100)
    queue = SkunkQueue("big", conn_url=str(tmp_path / "q.db"))
    add = queue.event(routes=["r"])(jobs.add.func)
    with pytest.raises(PayloadTooLarge, match="at most 100"):
        add.fire("x" * 200, "y")
    assert queue.counts() == {}


def test_pickle_is_opt_in_and_round_trips(tmp_path: Path) -> None:
    queue = SkunkQueue("p", conn_url=str(tmp_path / "q.db"), serializer="pickle")
    handle = queue.event(routes=["r"])(jobs.add.func).fire((1, 2), (3,))
    record = queue.get(handle.id)
    assert record is not None and record.serializer == "pickle"


def test_hooks_see_the_job_lifecycle(tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []

    class Plugin:
        @hookimpl
        def job_started(self, record: JobRecord) -> None:
            seen.append(("started", record.func))

        @hookimpl
        def job_finished(self, record: JobRecord, outcome) -> None:  # type: ignore[no-untyped-def]
            seen.append(("finished", outcome.state))

        @hookimpl
        def job_failed(self, record: JobRecord, error: dict[str, str]) -> None:
            seen.append(("failed", error["type"]))

    plugin = Plugin()
    plugin_manager().register(plugin)
    try:
        queue = SkunkQueue("hooks", conn_url=str(tmp_path / "q.db"))
        # The in-process worker runs only jobs declared (and still held) for its queue and route.
        add, fail = queue.event(routes=["r"])(jobs.add.func), queue.event(routes=["r"])(jobs.fail.func)
        ok, bad = add.fire(1, 1), fail.fire("no")
        worker = Worker(WorkerConfig(queue="hooks", route="r", url=str(tmp_path / "q.db")))
        worker.backend = worker.config.open()
        for record in worker.backend.claim("r", worker.id, 30, limit=2):
            worker.execute(record)
        assert (ok.state, ok.result, bad.state) == (COMPLETE, 2, ERROR)
        assert seen == [("started", jobs.add.name), ("finished", "complete"),
                        ("started", jobs.fail.name), ("finished", "error"), ("failed", "ValueError")]
    finally:
        plugin_manager().unregister(plugin)


def test_seed_import_paths_reexport_each_backends_default_cfg() -> None:
    from skunkqueue.persistence.mongodb import default_cfg as mongo
    from skunkqueue.persistence.redis import default_cfg as redis

    assert mongo["backend"] == "mongodb" and mongo["conn_url"] == "localhost:27017"
    assert redis["backend"] == "redis" and redis["conn_url"] == "localhost:6379"


def test_job_in_a_script_resolves_by_the_scripts_module_name(tmp_path: Path) -> None:
    """A job defined in the script being run (``__main__``) runs on a worker started with --path."""
    (tmp_path / "app").mkdir()
    script = tmp_path / "app" / "tasks.py"
    db = tmp_path / "q.db"
    script.write_text(textwrap.dedent(f"""
        from skunkqueue import SkunkQueue
        queue = SkunkQueue("script", conn_url={str(db)!r})

        @queue.event(routes=["r"])
        def shout(word):
            return word.upper()

        if __name__ == "__main__":
            handle = shout.fire("hi")
            print(shout.name, handle.wait(timeout=30))
    """))
    pool = subprocess.Popen([sys.executable, "-m", "skunkqueue.cli", "work", "-q", "script", "-r", "r",
                             "--url", str(db), "--path", str(tmp_path / "app")], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)
        assert out.stdout.split() == ["tasks:shout", "HI"], out.stderr
    finally:
        pool.terminate()
        pool.wait(20)


def test_the_readme_demo_runs_end_to_end(tmp_path: Path) -> None:
    env_bin = str(Path(sys.executable).parent)
    out = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], capture_output=True, text=True,
                         timeout=120, env={"PATH": f"{env_bin}:/usr/bin:/bin",
                                           "SKUNQ_SQLITE_PATH": str(tmp_path / "demo.db")})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "result 9" and lines[1] == "state complete"
    assert lines[2].startswith("scheduled ") and lines[2].endswith("is pending (due in 60 s)")


def test_fire_at_accepts_an_aware_datetime(queue: SkunkQueue) -> None:
    from datetime import timezone
    when = datetime.now(timezone.utc) + timedelta(minutes=5)
    handle = queue.event(routes=["r"])(jobs.add.func).fire_at(when, 1, 2)
    record = queue.get(handle.id)
    assert record is not None and abs(record.due - when.timestamp()) < 0.001


def test_jobs_lists_by_route_and_state_and_refuses_unknown_states(queue: SkunkQueue) -> None:
    add = queue.event(routes=["r", "s"])(jobs.add.func)
    handle = add.fire(1, 2)
    assert {r.id for r in queue.jobs()} == set(handle.ids)
    assert [r.route for r in queue.jobs(route="s", state="pending")] == ["s"]
    assert queue.jobs(state="complete") == [] and len(queue.jobs(limit=1)) == 1
    with pytest.raises(ConfigurationError, match="Unknown state 'done'"):
        queue.jobs(state="done")
