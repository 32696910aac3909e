"""Interpreters SkunkQueue starts never import from the working directory by accident.

A ``uuid.py`` or ``json.py`` in the folder a pool is started from must not
replace the standard library module in its workers (``python -m`` put that
folder first on ``sys.path``), in explicit mode or bare mode; job modules
there, their neighbours and ``PYTHONPATH`` keep working. Each shadowing file
appends a line to a file outside the queue if it is ever imported.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from skunkqueue import interpreter
from skunkqueue.persistence.sqlite import SQLitePersistence
from skunkqueue.record import COMPLETE
from skunkqueue.testing.suite_support import make_record, wait_until

SHADOWS = ("uuid", "json", "signal", "random")


def shadow(folder: Path, imported: Path) -> None:
    """Standard-library names in ``folder`` that leave a line in ``imported`` when imported."""
    for name in SHADOWS:
        (folder / f"{name}.py").write_text(
            f"open({str(imported)!r}, 'a').write({name!r} + ' ' + __file__ + '\\n')\n"
            f"raise ImportError('the {name}.py of the working directory was imported')\n")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A working directory with shadowing files, a job module and its neighbour; a PYTHONPATH folder."""
    folder = tmp_path / "workdir"
    folder.mkdir()
    shadow(folder, tmp_path / "imported")
    (tmp_path / "pp").mkdir()
    (tmp_path / "pp" / "pp_helper.py").write_text("WORD = 'from-pythonpath'\n")
    (folder / "cwd_helper.py").write_text("WORD = 'from-a-neighbour'\n")
    (folder / "cwd_jobs.py").write_text(textwrap.dedent("""
        import os
        import uuid

        import cwd_helper
        import pp_helper
        from skunkqueue import SkunkQueue

        queue = SkunkQueue("shadowed", conn_url=os.environ["SHADOW_DB"])

        @queue.event(routes=["r"])
        def work(path):
            with open(path, "a") as fh:
                fh.write(f"{cwd_helper.WORD} {pp_helper.WORD} {uuid.uuid4().hex[:4] and 'uuid-ok'}\\n")
            return os.getpid()
    """))
    return folder


@pytest.mark.parametrize("mode", ["explicit", "bare"])
def test_a_stdlib_named_file_in_the_working_directory_is_never_imported(workdir: Path, tmp_path: Path,
                                                                         mode: str) -> None:
    db = tmp_path / "q.db"
    env = {**os.environ, "SHADOW_DB": str(db), "PYTHONPATH": str(tmp_path / "pp"), "SKUNQ_IMPORT": ""}
    skunq = str(Path(sys.executable).with_name("skunq"))
    args = [skunq, "work", "-q", "shadowed", "-r", "r", "--url", str(db), "--concurrency", "2"]
    if mode == "explicit":
        args += ["--import", "cwd_jobs"]
    log = tmp_path / "executions"
    store = SQLitePersistence("shadowed", url=str(db))
    records = [make_record("shadowed", func="cwd_jobs:work", payload=f'[["{log}"],{{}}]'.encode())
               for _ in range(4)]
    store.enqueue(records)
    with open(tmp_path / "pool.log", "wb") as out:
        pool = subprocess.Popen(args, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: all((r := store.get(x.id)) is not None and r.state == COMPLETE for x in records)
                   or pool.poll() is not None or (tmp_path / "imported").exists(), timeout=60,
                   what="the jobs to complete")
    finally:
        pool.send_signal(signal.SIGTERM)
        pool.wait(30)
        store.close()
    output = (tmp_path / "pool.log").read_text()
    assert not (tmp_path / "imported").exists(), (tmp_path / "imported").read_text() + output
    assert pool.returncode == 0, output
    assert log.read_text().splitlines() == ["from-a-neighbour from-pythonpath uuid-ok"] * 4, output


def _pythons() -> list[str]:
    """This interpreter and any other CPython 3.9+ found (pyenv), to check BOOT on each."""
    found = {sys.executable}
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for minor in ("3.9", "3.10", "3.11", "3.12", "3.13"):
        for candidate in sorted(root.glob(f"{minor}.*/bin/python{minor}")):
            found.add(str(candidate))
            break
    return sorted(found)


@pytest.mark.parametrize("python", _pythons())
def test_boot_takes_the_working_directory_off_the_path_on_every_python(python: str, tmp_path: Path) -> None:
    workdir, pp = tmp_path / "workdir", tmp_path / "pp"
    workdir.mkdir()
    pp.mkdir()
    shadow(workdir, tmp_path / "imported")
    (pp / "probe.py").write_text(textwrap.dedent("""
        import json, os, random, signal, sys, uuid
        def main():
            print(json.dumps({"argv": sys.argv, "cwd_on_path": [p for p in sys.path
                              if p in ("", ".", os.getcwd())], "json": json.__file__}))
            return 3
    """))
    command = interpreter.command("probe", "a", "b")
    command[0] = python
    done = subprocess.run(command, cwd=workdir, env={**os.environ, "PYTHONPATH": str(pp)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert not (tmp_path / "imported").exists()
    seen = json.loads(done.stdout)
    assert seen["argv"] == ["probe", "a", "b"] and seen["cwd_on_path"] == []
    assert not seen["json"].startswith(str(workdir))
