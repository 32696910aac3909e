"""The README's first job ("Launching jobs"), run as written: its files, its worker, its outputs.

A ``python`` block whose first line is ``# NAME.py`` is that file; the ``bash`` block is the worker
(a real ``skunq work``); ``app.py`` then runs, and each line it prints must be what the comment on
its ``print`` line says. The embedded SQLite store lives in the test's folder.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```\s*$", re.S | re.M)


def section(title: str = "Launching jobs") -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index(f"## {title}"):].split("\n## ", 1)[0]


def python_files(title: str) -> dict[str, str]:
    """The section's ``python`` blocks whose first line names a file (``# NAME.py``)."""
    found = {}
    for lang, body in FENCE.findall(section(title)):
        named = re.match(r"# (\S+\.py)", body)
        if lang == "python" and named:
            found[named.group(1)] = body
    return found


def printed(script: str) -> list[str]:
    """What each ``print`` line of a script says, in its comment, it prints."""
    return [m.group(1) for m in re.finditer(r"^print\(.*#\s*(\S.*?)\s*$", script, re.M)]


def run_beside_the_worker(tmp_path: Path, files: dict[str, str], script: str) -> tuple[subprocess.CompletedProcess[str],
                                                                                     int | None, str]:
    """Write the files, start the README's worker, run ``script``; its run, the worker's exit status and log."""
    (worker_line,) = [body.strip() for lang, body in FENCE.findall(section()) if lang == "bash"]
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKUNQ_")}
    env.update(SKUNQ_SQLITE_PATH=str(tmp_path / "jobs.db"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    log = tmp_path / "worker.log"
    command = worker_line.split("#", 1)[0].strip()
    assert command.startswith("skunq work ")
    worker = subprocess.Popen(["bash", "-c", "exec " + command], cwd=tmp_path, env=env, stdout=log.open("w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120  # a loaded machine starts two interpreters slowly
        while "listening on queue" not in log.read_text():
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        run = subprocess.run([sys.executable, script], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=120)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
    return run, worker.returncode, log.read_text()


def test_the_readmes_first_job_runs_as_written(tmp_path: Path) -> None:
    files = python_files("Launching jobs")
    assert set(files) == {"tasks.py", "app.py"}, set(files)
    expected = printed(files["app.py"])
    assert len(expected) >= 2
    run, status, log = run_beside_the_worker(tmp_path, files, "app.py")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == expected
    assert status == 0, log
    assert len(re.findall(r"tasks:add .* complete", log)) == 1, log


def test_the_readmes_workflows_run_as_written(tmp_path: Path) -> None:
    files = {**python_files("Launching jobs"), **python_files("Workflows")}
    assert "more.py" in files, set(files)
    expected = printed(files["more.py"])
    assert len(expected) == 3
    run, status, log = run_beside_the_worker(tmp_path, files, "more.py")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == expected
    assert status == 0, log
    # 2 chain steps, 3 members and their callback, the dependent: each ran once.
    assert len(re.findall(r"tasks:add .* complete", log)) == 7, log


def test_every_python_block_of_the_readme_is_valid_python() -> None:
    blocks = [body for lang, body in FENCE.findall((ROOT / "README.md").read_text()) if lang == "python"]
    assert len(blocks) >= 5
    for body in blocks:
        compile(body, "README.md", "exec")  # a SyntaxError names the block's line
