"""examples/workflows.py end to end, as docs/guides/workflows.md tells it: a pool in the folder, then the script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_the_workflow_example_runs(tmp_path: Path) -> None:
    env = {**os.environ, "SKUNQ_SQLITE_PATH": str(tmp_path / "q.db")}
    pool = subprocess.Popen([sys.executable, "-m", "skunkqueue.cli", "work", "-q", "pictures", "-r", "images",
                             "--import", "workflows", "--concurrency", "2"],
                            cwd=EXAMPLES, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run = subprocess.run([sys.executable, "workflows.py"], cwd=EXAMPLES, env=env, capture_output=True,
                             text=True, timeout=120)
    finally:
        pool.terminate()
        pool.wait(20)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "chain: 36",
        "chord: thumbs.zip: a@256, b@256, c@256",
        "after: ['complete', 'complete']",
    ]
