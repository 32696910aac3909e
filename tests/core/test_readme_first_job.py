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


def section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme[readme.index("## Launching jobs"):].split("\n## ", 1)[0]


def test_the_readmes_first_job_runs_as_written(tmp_path: Path) -> None:
    blocks = FENCE.findall(section())
    files = {re.match(r"# (\S+\.py)", body).group(1): body  # type: ignore[union-attr]
             for lang, body in blocks if lang == "python"}
    assert set(files) == {"tasks.py", "app.py"}, set(files)
    (worker_line,) = [body.strip() for lang, body in blocks if lang == "bash"]
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    expected = [m.group(1) for m in re.finditer(r"^print\(.*#\s*(\S.*?)\s*$", files["app.py"], re.M)]
    assert len(expected) >= 2

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
        run = subprocess.run([sys.executable, "app.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=120)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(30)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == expected
    assert worker.returncode == 0, log.read_text()
    assert len(re.findall(r"tasks:add .* complete", log.read_text())) == 1, log.read_text()
