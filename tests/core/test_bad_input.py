"""Bad input gets one clear error (or a documented meaning), never a raw exception."""

from __future__ import annotations

import inspect
import math
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from skunkqueue import SkunkQueue, policy
from skunkqueue.cli import main
from skunkqueue.errors import ConfigurationError, InvalidArguments, SerializationError
from skunkqueue.persistence.sqlite import SQLitePersistence
from skunkqueue.record import JobRecord, new_id
from skunkqueue.testing import jobs


@pytest.fixture
def queue(tmp_path: Path) -> SkunkQueue:
    return SkunkQueue("bad", conn_url=str(tmp_path / "q.db"))


def skunq(*args: str | bytes, cwd: Path | None = None, env: dict[str, str] | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "skunkqueue.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


def one_clear_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("Error: "), result.stderr
    return lines[-1]


def deeply_nested(depth: int) -> list[object]:
    value: list[object] = []
    for _ in range(depth):
        value = [value]
    return value


def test_arguments_nested_too_deeply_are_a_serialization_error(queue: SkunkQueue) -> None:
    add = queue.event(routes=["r"])(jobs.add.func)
    with pytest.raises(SerializationError, match="nested too deeply"):
        add.fire(deeply_nested(10_000), 1)
    with pytest.raises(SerializationError, match="nested too deeply"):
        add.fire_many([(1, 2), (deeply_nested(10_000), 1)])
    pickled = SkunkQueue("bad-pickle", conn_url=queue.conn_url, serializer="pickle")
    with pytest.raises(SerializationError, match="nested too deeply"):
        pickled.event(routes=["r"])(jobs.add.func).fire(deeply_nested(100_000), 1)
    assert queue.counts() == {} and pickled.counts() == {}
    assert add.fire(deeply_nested(200), 1).id  # ordinary nesting still works


@pytest.mark.parametrize("bad", ["\udcff", "ok\ud800"])
def test_names_with_lone_surrogates_are_a_configuration_error(bad: str, queue: SkunkQueue) -> None:
    with pytest.raises(ConfigurationError, match="cannot be encoded as UTF-8"):
        SkunkQueue(bad)
    with pytest.raises(ConfigurationError, match="route name .* cannot be encoded"):
        queue.event(routes=["r", bad])(jobs.add.func)


def test_the_cli_refuses_an_undecodable_queue_name_in_one_line(tmp_path: Path) -> None:
    # On POSIX, a byte that is not UTF-8 reaches Python as a lone surrogate.
    result = subprocess.run([sys.executable.encode(), b"-m", b"skunkqueue.cli", b"status", b"-q", b"\xff",
                             b"--url", str(tmp_path / "q.db").encode()], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert "cannot be encoded as UTF-8" in one_clear_line(result)


def test_negative_delays_are_refused(queue: SkunkQueue) -> None:
    add = queue.event(routes=["r"])(jobs.add.func)
    with pytest.raises(ConfigurationError, match="negative delay"):
        add.fire_at(timedelta(seconds=-5), 1, 2)
    assert queue.counts() == {}
    record = queue.get(add.fire_at(timedelta(0), 1, 2).id)
    assert record is not None and record.due <= time.time()


def test_a_past_datetime_is_due_now_behind_the_jobs_already_waiting(queue: SkunkQueue) -> None:
    add = queue.event(routes=["r"])(jobs.add.func)
    first, second = add.fire(1, 1), add.fire(2, 2)
    before = time.time()
    past = add.fire_at(datetime.now(timezone.utc) - timedelta(days=365), 3, 3)
    after = add.fire(4, 4)
    record = queue.get(past.id)
    assert record is not None and before <= record.due <= time.time()
    order = [r.id for r in queue.persistence.claim("r", "w", 30, limit=10)]
    assert order == [first.id, second.id, past.id, after.id]


def test_sqlite_takes_a_path_or_a_sqlite_url_and_nothing_else(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for url in ("http://example/x", "redis://localhost:6379", "sqlite://relative.db", "file:///tmp/x.db"):
        with pytest.raises(ConfigurationError, match="file path or sqlite:///"):
            SQLitePersistence("q", url=url)
    with pytest.raises(ConfigurationError, match="':memory:'"):
        SQLitePersistence("q", url=":memory:")
    missing = tmp_path / "nonexistent" / "dir" / "x.db"
    with pytest.raises(ConfigurationError, match="does not exist; create it first"):
        SQLitePersistence("q", url=str(missing))
    assert os.listdir(tmp_path) == [], "a refused URL created something"
    by_url = SQLitePersistence("q", url=f"sqlite://{tmp_path}/u.db")
    by_path = SQLitePersistence("q", url="p.db")
    assert by_url.path == tmp_path / "u.db" and (tmp_path / "u.db").exists() and (tmp_path / "p.db").exists()
    by_url.close()
    by_path.close()


def test_the_default_sqlite_folder_is_the_only_one_created(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SKUNQ_SQLITE_PATH", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    store = SQLitePersistence("q")
    assert store.path == tmp_path / "xdg" / "skunkqueue" / "skunkqueue.db" and store.path.exists()
    store.close()
    monkeypatch.setenv("SKUNQ_SQLITE_PATH", str(tmp_path / "not-there" / "q.db"))
    with pytest.raises(ConfigurationError, match="does not exist"):
        SQLitePersistence("q")


def test_the_cli_refuses_a_bad_sqlite_url_in_one_line(tmp_path: Path) -> None:
    result = skunq("status", "-q", "q", "--backend", "sqlite", "--url", "http://example/x", cwd=tmp_path)
    assert result.returncode == 1 and "file path or sqlite:///" in one_clear_line(result)
    # Without --backend the address names the backend, and no backend takes http://.
    result = skunq("status", "-q", "q", "--url", "http://example/x", cwd=tmp_path)
    assert result.returncode == 1 and "No installed backend takes http:// addresses" in one_clear_line(result)
    assert os.listdir(tmp_path) == []


def test_arguments_are_checked_against_the_signature_at_fire(queue: SkunkQueue) -> None:
    add = queue.event(routes=["r"])(jobs.add.func)
    with pytest.raises(InvalidArguments, match=r"skunkqueue.testing.jobs:add\(first.*second.*missing"):
        add.fire(1)
    with pytest.raises(InvalidArguments, match="too many positional arguments"):
        add.fire(1, 2, 3)
    with pytest.raises(InvalidArguments, match="unexpected keyword argument 'third'"):
        add.fire(1, 2, third=3)
    with pytest.raises(TypeError):  # still a TypeError for callers that catch that
        add.fire_many([(1, 2), (1,)])
    with pytest.raises(InvalidArguments):
        add.fire_at(timedelta(seconds=1), 1)
    assert queue.counts() == {}, "a refused call was stored"
    assert add.fire(1, second=2).id and add.fire_many([(1, 2), {"first": 1, "second": 2}])


def _plain(a, b, c=1): ...  # type: ignore[no-untyped-def]
def _star(a, *rest): ...  # type: ignore[no-untyped-def]
def _kwonly(a, *, b): ...  # type: ignore[no-untyped-def]
def _posonly(a, /, b=2): ...  # type: ignore[no-untyped-def]
def _none(): ...  # type: ignore[no-untyped-def]


@pytest.mark.parametrize("func", [_plain, _star, _kwonly, _posonly, _none])
def test_fire_accepts_exactly_the_calls_the_signature_binds(queue: SkunkQueue, func: Any) -> None:
    # fire counts positional arguments for plain signatures instead of binding: the two must agree.
    job = queue.event(routes=["r"])(func)
    shapes: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((), {}), ((1,), {}), ((1, 2), {}), ((1, 2, 3), {}), ((1, 2, 3, 4), {}),
        ((1,), {"b": 2}), ((), {"a": 1}), ((1, 2), {"c": 3}), ((1,), {"zz": 1})]
    for args, kwargs in shapes:
        try:
            inspect.signature(func).bind(*args, **kwargs)
            binds = True
        except TypeError:
            binds = False
        try:
            job.check_arguments(args, kwargs)
            accepted = True
        except InvalidArguments:
            accepted = False
        assert accepted == binds, (func.__name__, args, kwargs)


def test_work_refuses_a_path_that_does_not_exist(tmp_path: Path) -> None:
    result = skunq("work", "-q", "q", "-r", "r", "--url", str(tmp_path / "q.db"), "--path", "/nonexistent")
    assert result.returncode == 2 and "'/nonexistent' does not exist" in result.stderr


def test_work_refuses_an_import_it_cannot_import_in_one_line(tmp_path: Path) -> None:
    result = skunq("work", "-q", "q", "-r", "r", "--url", str(tmp_path / "q.db"), "--import", "no_such_jobs_mod")
    assert result.returncode == 1
    assert "Cannot import --import module 'no_such_jobs_mod'" in one_clear_line(result)
    result = skunq("work", "-q", "q", "-r", "r", "--url", str(tmp_path / "q.db"),
                   env={"SKUNQ_IMPORT": "skunkqueue.testing.jobs, ../evil"})
    assert result.returncode == 1 and "'../evil' is not a module name" in one_clear_line(result)


def test_help_names_the_environment_variables_and_q_is_not_required() -> None:
    runner = CliRunner()
    top = runner.invoke(main, ["--help"]).output
    assert all(v in top for v in ("SKUNQ_QUEUE", "SKUNQ_BACKEND", "SKUNQ_URL", "SKUNQ_DB", "SKUNQ_IMPORT"))
    work = " ".join(runner.invoke(main, ["work", "--help"]).output.split())  # undo the wrapping
    assert "env var: SKUNQ_QUEUE" in work and "env var: SKUNQ_IMPORT" in work and "env var: SKUNQ_URL" in work
    assert "[required]" not in work
    missing = runner.invoke(main, ["status"], env={"SKUNQ_QUEUE": None})
    assert missing.exit_code == 2 and "-q QUEUE, or set SKUNQ_QUEUE" in missing.output


def test_the_pool_log_names_the_sqlite_file(tmp_path: Path) -> None:
    db = tmp_path / "named.db"
    pool = subprocess.Popen([sys.executable, "-m", "skunkqueue.cli", "work", "-q", "q", "-r", "r", "--url",
                             f"sqlite://{db}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert pool.stdout is not None
        line = pool.stdout.readline()
        # Stop it only once its worker is up: a pool signalled while starting is another story.
        store = SQLitePersistence("q", url=str(db))
        deadline = time.monotonic() + 30
        while not store.workers() and time.monotonic() < deadline:
            time.sleep(0.05)
        store.close()
    finally:
        pool.send_signal(signal.SIGTERM)
        pool.communicate(timeout=30)
    assert f"on sqlite {db}" in line and "default address" not in line


def test_times_that_are_not_finite_are_refused_in_one_line(tmp_path: Path) -> None:
    queue = SkunkQueue("finite", conn_url=str(tmp_path / "q.db"))
    for bad in (math.inf, math.nan, -1, "3", 1e16):  # Redis: PEXPIRE of 1e19 ms is out of range
        with pytest.raises(ConfigurationError, match="result_ttl must be a number of seconds from 0 to 100 years"):
            SkunkQueue("finite", conn_url=str(tmp_path / "q.db"), result_ttl=bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="result_ttl must be a number of seconds from 0 to 100 years"):
            queue.event(routes=["r"], result_ttl=bad)(jobs.add.func)  # type: ignore[arg-type]
    for options in ({"retry_backoff": math.inf}, {"retry_backoff": math.nan}, {"timeout": math.inf},
                    {"timeout": math.nan}):
        with pytest.raises(ConfigurationError, match="finite numbers"):
            queue.event(routes=["r"], **options)(jobs.add.func)  # type: ignore[arg-type]


def test_exponential_back_off_stops_growing_and_never_overflows() -> None:
    """retries=2000, retry_backoff=0: the 1025th attempt computed 0.0 * 2**1024, which is no float
    (OverflowError in the worker); the delay is now capped at policy.MAX_RETRY_DELAY."""
    record = JobRecord(id=new_id(), queue="q", route="r", func="m:f", payload=b"[[],{}]", due=0.0,
                       created=0.0, retries=5000, retry_backoff=0.0)
    for attempts, backoff in ((1025, 0.0), (4000, 1.0), (60, 1.0), (3, 1e300)):
        record.attempts, record.retry_backoff = attempts, backoff
        outcome = policy.failed(record, {"type": "E", "message": "m", "traceback": ""})
        assert outcome.due is not None and outcome.due <= time.time() + policy.MAX_RETRY_DELAY
    record.attempts, record.retry_backoff = 3, 1.0
    assert 2.0 <= policy.backoff_delay(record) <= 4.0  # 1 * 2**2, scaled by 0.5-1.0: as before
