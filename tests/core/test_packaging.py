"""Each backend distribution installs on its own, without the other backends' drivers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVERS = {"redis": "redis", "mongodb": "pymongo", "fdb": "foundationdb", "postgres": "psycopg"}


@pytest.mark.parametrize(("backend", "folder"), [("redis", "skunkqueue-redis"),
                                                 ("mongodb", "skunkqueue-mongo"),
                                                 ("fdb", "skunkqueue-fdb"),
                                                 ("postgres", "skunkqueue-postgres")])
def test_a_backend_installs_into_a_fresh_venv_with_only_its_own_driver(
        backend: str, folder: str, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              str(ROOT / "skunkqueue-core"), str(ROOT / folder)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout.lower()
    installed = {line.split("==")[0] for line in listed.split()}
    assert DRIVERS[backend] in installed
    assert not installed & (set(DRIVERS.values()) - {DRIVERS[backend]}), installed
    backends = subprocess.run([str(venv / "bin" / "skunq"), "backends"], capture_output=True, text=True,
                              check=True).stdout
    assert sorted(line.split()[0] for line in backends.splitlines()) == sorted(["sqlite", backend])
    # Both distributions carry the MIT licence their metadata names, and the backend pins the core's line.
    for dist in ("skunkqueue", folder):
        meta = subprocess.run([str(python), "-c", f"import importlib.metadata as m; d = m.distribution({dist!r}); "
                               "print(d.metadata['License-Expression']); print(*(d.requires or []), sep='\\n'); "
                               "print(*[str(f) for f in d.files if 'LICENSE' in str(f)])"],
                              capture_output=True, text=True, check=True).stdout
        assert meta.startswith("MIT\n") and "LICENSE" in meta, meta
        if dist != "skunkqueue":
            assert "skunkqueue<0.3,>=0.2" in meta or "skunkqueue>=0.2,<0.3" in meta, meta


@pytest.mark.parametrize("module", ["skunkqueue.testing.jobs", "skunkqueue.testing.periodic_jobs", "benchmarks.jobs"])
def test_a_job_module_using_the_kits_helpers_does_not_load_pytest_into_the_worker(module: str) -> None:
    # Workers of the kit and of make bench import these; pytest and the suites would add ~0.3 s and
    # ~10 MB to every worker's start-up, and make bench's start-up and memory figures with them.
    code = (f"import sys, {module}, skunkqueue.testing as t; loaded = 'pytest' in sys.modules; "
            "t.ConformanceSuite; print(loaded, 'pytest' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]  # loaded only once the suites are asked for
