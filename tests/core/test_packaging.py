"""Each backend distribution installs on its own, without the other backends' drivers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVERS = {"redis": "redis", "mongodb": "pymongo", "fdb": "foundationdb", "postgres": "psycopg"}
BACKENDS = [("redis", "skunkqueue-redis"), ("mongodb", "skunkqueue-mongo"), ("fdb", "skunkqueue-fdb"),
            ("postgres", "skunkqueue-postgres")]
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


@pytest.fixture(scope="session")
def built_wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The core's and the four backends' wheels, built once from the working tree (what PyPI would
    serve); the root conftest.py sends every test using this to one pytest-xdist process."""
    folder = tmp_path_factory.mktemp("wheels")
    # Built from copies: setuptools rewrites a tree's *.egg-info while it builds, and the editable
    # installs put those trees on sys.path, so a build in place made other test processes see a
    # half-written entry_points.txt ("No SkunkQueue backend named 'sqlite' is installed").
    sources = tmp_path_factory.mktemp("sources")
    trees = []
    for name in ["skunkqueue-core", *(f for _, f in BACKENDS)]:
        trees.append(str(shutil.copytree(ROOT / name, sources / name, ignore=shutil.ignore_patterns(
            "*.egg-info", "build", "__pycache__", "tests"))))
    built = subprocess.run([*PIP, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(folder), *trees],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    return folder


def _wheel(folder: Path, distribution: str) -> str:
    [wheel] = folder.glob(distribution.replace("-", "_") + "-*.whl")
    return str(wheel)


@pytest.mark.parametrize(("backend", "folder"), BACKENDS)
def test_a_backend_installs_into_a_fresh_venv_with_only_its_own_driver(
        backend: str, folder: str, tmp_path: Path, built_wheels: Path) -> None:
    # A fresh venv each, so that no other backend's driver can be there; this interpreter's pip
    # installs into it (--python), which spares each venv a copy of pip of its own.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([*PIP, "--python", str(python), "install", "--quiet",
                              _wheel(built_wheels, "skunkqueue"), _wheel(built_wheels, folder)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    listed = subprocess.run([*PIP, "--python", str(python), "list", "--format=freeze"],
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
