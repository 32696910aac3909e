"""The ``skunq`` command line: listings and clear errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys
import time

from click.testing import CliRunner

from skunkqueue.cli import main


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "skunkqueue.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_backends_lists_every_installed_backend_with_its_distribution() -> None:
    result = CliRunner().invoke(main, ["backends"])
    assert result.exit_code == 0
    rows = {line.split()[0]: line.split()[1] for line in result.output.splitlines()}
    assert rows["sqlite"] == "skunkqueue"
    assert rows.get("redis") == "skunkqueue-redis" and rows.get("mongodb") == "skunkqueue-mongo"
    assert rows.get("fdb") == "skunkqueue-fdb"


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
