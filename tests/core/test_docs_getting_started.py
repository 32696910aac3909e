"""Every code block of docs/getting-started.md, run as written and in order, as a newcomer would.

The page's blocks are the test's script: ``python title="X"`` blocks are written to file X,
``bash`` blocks run in bash (a ``skunq work`` line without ``--burst`` is the worker a newcomer
leaves running in a second terminal: it is started in the background), and in ``console`` blocks
each ``$ command`` runs and what it prints must be the lines the page shows under it. The install
block makes a fresh virtual environment and installs the core from this checkout, which the page
says sits next to the project folder (``../skunkqueue``), so nothing from the test's own
environment leaks in. The store is the embedded SQLite default, under a HOME of the test's own.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "getting-started.md"
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```\s*$", re.S | re.M)
TITLE = re.compile(r'title="([^"]+)"')


@dataclass
class Block:
    lang: str
    title: str | None
    body: str


def blocks(text: str) -> list[Block]:
    found = []
    for lang, info, body in FENCE.findall(text):
        title = TITLE.search(info)
        found.append(Block(lang, title.group(1) if title else None, body))
    return found


def console_steps(body: str) -> list[tuple[str, list[str]]]:
    """``[(command, expected output lines)]`` of a console block."""
    steps: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            assert steps, f"a console block must start with a '$ ' command:\n{body}"
            steps[-1][1].append(line)
    return steps


def is_worker(body: str) -> bool:
    return any(line.startswith("skunq work") and "--burst" not in line for line in body.splitlines())


def test_the_page_has_the_blocks_this_test_knows_how_to_run() -> None:
    # A page rewritten into blocks this test would skip must fail here, not pass quietly.
    found = blocks(PAGE.read_text())
    assert len(found) >= 7
    assert {b.lang for b in found} <= {"bash", "python", "console"}, {b.lang for b in found}
    assert all(b.title for b in found if b.lang == "python"), "a python block needs title=\"FILE.py\""
    assert sum(is_worker(b.body) for b in found) == 1
    assert sum(len(console_steps(b.body)) for b in found if b.lang == "console") >= 3
    # The install comes first: every later block runs in the environment it makes.
    assert found[0].lang == "bash" and "python3 -m venv .venv" in found[0].body


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "skunkqueue").symlink_to(ROOT)  # "the repository cloned next to your project's folder"
    folder = tmp_path / "myproject"
    folder.mkdir()
    (tmp_path / "home").mkdir()
    return folder


def test_every_block_of_getting_started_runs(project: Path) -> None:
    home = project.parent / "home"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SKUNQ_", "VIRTUAL_ENV", "PYTHON", "PIP_USER"))}
    # The test's own venv must not be found first: the page's commands must come from the page's venv.
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(ROOT)))
    env.update(HOME=str(home), XDG_DATA_HOME=str(home / ".local" / "share"))
    activated = False
    worker: subprocess.Popen[str] | None = None
    worker_log = project.parent / "worker.log"
    ran: list[str] = []

    def bash(script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        prefix = ". .venv/bin/activate\n" if activated else ""  # the terminal where the venv was activated
        return subprocess.run(["bash", "-euo", "pipefail", "-c", prefix + script], cwd=project, env=env,
                              capture_output=True, text=True, timeout=timeout)

    try:
        for block in blocks(PAGE.read_text()):
            if block.lang == "python":
                assert block.title is not None
                (project / block.title).write_text(block.body)
                ran.append(f"wrote {block.title}")
            elif block.lang == "bash" and is_worker(block.body):
                assert worker is None
                prefix = ". .venv/bin/activate\n" if activated else ""
                worker = subprocess.Popen(["bash", "-euo", "pipefail", "-c", prefix + "exec " + block.body.strip()],
                                          cwd=project, env=env, stdout=worker_log.open("w"),
                                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
                deadline = time.monotonic() + 120  # a loaded machine starts two interpreters slowly
                while "listening on queue tutorial route default; store sqlite" not in worker_log.read_text():
                    assert worker.poll() is None, f"the worker exited:\n{worker_log.read_text()}"
                    assert time.monotonic() < deadline, f"the worker never listened:\n{worker_log.read_text()}"
                    time.sleep(0.1)
                ran.append("started the worker")
            elif block.lang == "bash":
                done = bash(block.body, timeout=600)
                assert done.returncode == 0, f"{block.body}\n{done.stdout}\n{done.stderr}"
                activated = activated or ". .venv/bin/activate" in block.body
                ran.append(f"ran {block.body.splitlines()[0]}")
            elif block.lang == "console":
                for command, expected in console_steps(block.body):
                    done = bash(command)
                    assert done.returncode == 0, f"$ {command}\n{done.stdout}\n{done.stderr}"
                    assert done.stdout.rstrip("\n").splitlines() == expected, f"$ {command}\n{done.stderr}"
                    ran.append(f"$ {command}")
            else:
                pytest.fail(f"no rule to run a {block.lang} block")
        # What the install block promised, from the page's own environment.
        assert (project / ".venv" / "bin" / "skunq").exists()
        assert bash("skunq backends").stdout.split()[0] == "sqlite"
        assert bash("python -c 'import skunkqueue, sys; print(skunkqueue.__file__)'").stdout.startswith(
            str(project / ".venv"))
        assert worker is not None
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)  # the gentle stop the page mentions
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(10)
    log = worker_log.read_text()
    assert worker is not None and worker.returncode == 0, log
    # The worker ran each fired job in this process group, the failing one three times.
    assert len(re.findall(r"tasks:divide .* (error|pending)", log)) == 3, log
    assert len(re.findall(r"tasks:add .* complete", log)) == 2, log
    # The jobs went to the embedded default, under the test's HOME.
    assert (home / ".local" / "share" / "skunkqueue" / "skunkqueue.db").exists()
    assert ran[0].startswith("ran python3 -m venv")
