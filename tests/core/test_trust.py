"""The trust boundary, in process: what ``trust.resolve`` imports and what it lets a worker run.

Each test writes its own uniquely named modules, and every module with an
import-time effect leaves a file behind, so "not imported" is checked on disk
as well as in ``sys.modules``.
"""

from __future__ import annotations

import os
import sys
import sysconfig
import textwrap
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from skunkqueue import trust
from skunkqueue.errors import ConfigurationError, JobRefused


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The worker's working directory, first on sys.path as a worker has it."""
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    before = set(sys.modules)
    yield workdir
    for name in set(sys.modules) - before:
        if name.startswith("t_"):
            del sys.modules[name]


@pytest.fixture
def off_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on sys.path, ahead of the roots, that is not a root itself."""
    folder = tmp_path / "off-root"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    return folder


def unique(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def write_module(folder: Path, name: str, marker: Path, body: str = "") -> Path:
    """``name`` (dotted names become packages) whose import creates ``marker``."""
    *packages, leaf = name.split(".")
    for package in packages:
        folder = folder / package
        folder.mkdir(exist_ok=True)
        (folder / "__init__.py").touch()
    path = folder / f"{leaf}.py"
    path.write_text(f"open({str(marker)!r}, 'a').close()\n" + textwrap.dedent(body))
    return path


JOBS = """
    from skunkqueue import SkunkQueue
    queue = SkunkQueue("tenant-a", conn_url={db!r})

    @queue.event(routes=["r"])
    def job():
        return "ran"

    def plain():
        return "not a job"
"""


def test_bare_mode_imports_a_package_under_the_roots_and_runs_only_its_queue_and_route(
        root: Path, tmp_path: Path) -> None:
    pkg = unique()
    marker = tmp_path / "imported"
    write_module(root, f"{pkg}.jobs", marker, JOBS.format(db=str(tmp_path / "q.db")))
    job = trust.resolve(f"{pkg}.jobs:job", "tenant-a", "r")
    assert job.func() == "ran" and marker.exists()
    with pytest.raises(JobRefused, match="on another queue, not on queue 'tenant-b'") as info:
        trust.resolve(f"{pkg}.jobs:job", "tenant-b", "r")
    assert "tenant-a" not in str(info.value), "another tenant's queue name leaked into the message"
    with pytest.raises(JobRefused, match="on queue 'tenant-a' for route\\(s\\) 'r', not for route 'admin'"):
        trust.resolve(f"{pkg}.jobs:job", "tenant-a", "admin")
    with pytest.raises(JobRefused, match="not decorated with @queue.event"):
        trust.resolve(f"{pkg}.jobs:plain", "tenant-a", "r")
    with pytest.raises(JobRefused, match="has no job 'missing'"):
        trust.resolve(f"{pkg}.jobs:missing", "tenant-a", "r")


def test_a_module_under_a_path_root_is_found_too(root: Path, tmp_path: Path, off_root: Path) -> None:
    extra = off_root
    name = unique()
    write_module(extra, name, tmp_path / "imported", JOBS.format(db=str(tmp_path / "q.db")))
    with pytest.raises(JobRefused, match="lives outside them"):
        trust.resolve(f"{name}:job", "tenant-a", "r")  # on sys.path, but not a root
    with pytest.raises(JobRefused, match="no such module under"):
        trust.resolve(f"{unique()}:job", "tenant-a", "r")
    assert trust.resolve(f"{name}:job", "tenant-a", "r", paths=[str(extra)]).func() == "ran"


def test_explicit_mode_never_imports_on_demand(root: Path, tmp_path: Path) -> None:
    name = unique()
    marker = tmp_path / "imported"
    write_module(root, name, marker, JOBS.format(db=str(tmp_path / "q.db")))
    with pytest.raises(JobRefused, match=f"Refused to import module '{name}'.*--import \\(myapp.jobs\\)"):
        trust.resolve(f"{name}:job", "tenant-a", "r", imports=["myapp.jobs"])
    assert not marker.exists() and name not in sys.modules
    trust.import_allowed([name])  # what the worker does at start with --import NAME
    assert trust.resolve(f"{name}:job", "tenant-a", "r", imports=[name]).func() == "ran"


def test_stdlib_modules_are_refused_before_import(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "this" not in sys.modules, "the test process imported `this` already; pick another module"
    with pytest.raises(JobRefused, match="Refused to import module 'this'.*lives outside them"):
        trust.resolve("this:x", "q", "r")
    with pytest.raises(JobRefused, match="Refused to import module 'unittest'"):
        trust.resolve("unittest.__main__:main", "q", "r")
    builtin = next((n for n in sys.builtin_module_names if n not in sys.modules), None)
    if builtin is not None:
        with pytest.raises(JobRefused, match="built into Python"):
            trust.resolve(f"{builtin}:x", "q", "r")
    assert "this" not in sys.modules and "unittest.__main__" not in sys.modules
    assert "Beautiful is better" not in capsys.readouterr().out


def test_a_loaded_module_is_never_re_imported_and_runs_nothing_undeclared(root: Path) -> None:
    with pytest.raises(JobRefused, match="'os:system' is not decorated"):
        trust.resolve("os:system", "q", "r")


def test_modules_elsewhere_on_sys_path_are_refused(root: Path, tmp_path: Path, off_root: Path) -> None:
    elsewhere = off_root
    name = unique()
    marker = tmp_path / "imported"
    write_module(elsewhere, name, marker)
    with pytest.raises(JobRefused, match=f"Refused to import module '{name}'.*lives outside them"):
        trust.resolve(f"{name}:x", "q", "r")
    assert not marker.exists() and name not in sys.modules


def test_a_symlink_out_of_the_roots_is_refused(root: Path, tmp_path: Path) -> None:
    target = tmp_path / "outside.py"
    target.write_text(f"open({str(tmp_path / 'imported')!r}, 'a').close()\n")
    name = unique()
    os.symlink(target, root / f"{name}.py")
    with pytest.raises(JobRefused, match="lives outside them"):
        trust.resolve(f"{name}:x", "q", "r")
    assert not (tmp_path / "imported").exists()


def test_a_package_shadowing_a_loaded_module_is_refused(root: Path, tmp_path: Path) -> None:
    import json  # noqa: F401 - loaded from the standard library
    write_module(root, "json.evil", tmp_path / "imported")
    with pytest.raises(JobRefused, match="already loaded from elsewhere"):
        trust.resolve("json.evil:x", "q", "r")
    assert not (tmp_path / "imported").exists()


def test_site_packages_given_as_a_root_is_still_refused(root: Path) -> None:
    purelib = sysconfig.get_paths()["purelib"]
    candidates = [n for n in ("mypy", "ruff", "pygments") if n not in sys.modules
                  and os.path.exists(os.path.join(purelib, n))]
    if not candidates:
        pytest.skip(f"no unimported package found in {purelib} to try")
    name = candidates[0]
    with pytest.raises(JobRefused, match=f"Refused to import module '{name}'"):
        trust.resolve(f"{name}:x", "q", "r", paths=[purelib])
    assert name not in sys.modules


@pytest.mark.parametrize("name", ["", "nocolon", ":x", "x:", "a:b:c", "../etc:x", "a b:c", "os:system;id",
                                  "a..b:c", "\udcff:x"])
def test_hostile_names_are_refused_without_looking_anything_up(name: str, root: Path) -> None:
    with pytest.raises(JobRefused, match="not a job name"):
        trust.resolve(name, "q", "r")


def test_import_errors_of_allowed_modules_are_one_clear_line(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="Cannot import --import module 'no_such_mod_q'"):
        trust.import_allowed(["no_such_mod_q"])
    name = unique()
    write_module(root, name, tmp_path / "m", "raise RuntimeError('boom at import')\n")
    with pytest.raises(ConfigurationError, match="RuntimeError: boom at import"):
        trust.import_allowed([name])
    assert trust.split_imports(["a.b, c", "d"]) == ["a.b", "c", "d"]
    with pytest.raises(ConfigurationError, match="not a module name"):
        trust.split_imports(["a/b"])


def test_the_checked_file_is_the_one_executed_even_behind_another_sys_path_entry(
        root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A same-named module on a sys.path entry ahead of the roots is never the one imported."""
    ahead = tmp_path / "ahead"
    ahead.mkdir()
    name = unique()
    write_module(ahead, name, tmp_path / "wrong-file-imported")
    write_module(root, name, tmp_path / "imported", JOBS.format(db=str(tmp_path / "q.db")))
    monkeypatch.syspath_prepend(str(ahead))  # now ahead of the root
    assert trust.resolve(f"{name}:job", "tenant-a", "r").func() == "ran"
    assert (tmp_path / "imported").exists() and not (tmp_path / "wrong-file-imported").exists()


def test_namespace_packages_and_failing_modules_under_the_roots(root: Path, tmp_path: Path) -> None:
    ns = unique()
    (root / ns).mkdir()  # no __init__.py: a namespace package
    write_module(root / ns, "jobs", tmp_path / "imported", JOBS.format(db=str(tmp_path / "q.db")))
    assert trust.resolve(f"{ns}.jobs:job", "tenant-a", "r").func() == "ran"
    broken = unique()
    write_module(root, broken, tmp_path / "broken", "raise SystemExit('a module that exits')\n")
    # What a module raises at import reaches the worker as it is (recorded with its real type).
    with pytest.raises(SystemExit, match="a module that exits"):
        trust.resolve(f"{broken}:x", "q", "r")
    assert broken not in sys.modules
