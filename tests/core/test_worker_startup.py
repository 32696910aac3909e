"""A worker the pool told its backend's entry point and plugins loads them without scanning.

The pool looks both up once (``WorkerConfig.entry``, ``WorkerConfig.plugins``);
a worker that scanned the installed distributions again would pay about 20 ms
of importlib.metadata per start. The plugin here appends to a file outside the
queue when its hook runs, with what the worker had imported by then.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from skunkqueue import interpreter
from skunkqueue.worker import EXIT_DRAINED, WorkerConfig

SQLITE_ENTRY = "skunkqueue.persistence.sqlite:SQLitePersistence"


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "probe_plugin.py").write_text(textwrap.dedent(f"""
        import json
        import sys

        from skunkqueue import hookimpl

        @hookimpl
        def worker_started(worker):
            with open({str(tmp_path / "seen")!r}, "a") as fh:
                fh.write(json.dumps({{"worker": worker.id, "modules": sorted(sys.modules)}}) + "\\n")
    """))
    # Registered under the entry point group, as an installed plugin would be.
    dist = folder / "skunq_probe-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: skunq-probe\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[skunkqueue.plugins]\nprobe = probe_plugin\n")
    return folder


def run_worker(tmp_path: Path, plugin_dir: Path, **fields: object) -> subprocess.CompletedProcess[str]:
    config = WorkerConfig(queue="startup", route="r", backend="sqlite", url=str(tmp_path / "q.db"), burst=True,
                          connect_attempts=1, **fields)  # type: ignore[arg-type]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(plugin_dir),
                                                                        os.environ.get("PYTHONPATH")]))}
    return subprocess.run(interpreter.command("skunkqueue.worker_main", config.to_json()), cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)


def seen(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "seen"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_worker_told_its_entries_loads_them_and_scans_nothing(tmp_path: Path, plugin_dir: Path) -> None:
    done = run_worker(tmp_path, plugin_dir, entry=SQLITE_ENTRY, plugins=[["probe", "probe_plugin"]])
    assert done.returncode == EXIT_DRAINED, done.stderr
    [started] = seen(tmp_path)
    modules = started["modules"]
    assert isinstance(modules, list)
    assert "importlib.metadata" not in modules, "the worker scanned the installed distributions"
    assert "click" not in modules, "the web plugin (or something else) imported click into the worker"
    assert "skunkqueue_web.plugin" not in modules, "plugins other than those it was told were loaded"


def test_the_entry_is_what_the_worker_imports(tmp_path: Path, plugin_dir: Path) -> None:
    """Not a scan by name: an entry naming a missing module fails the start, in one line."""
    done = run_worker(tmp_path, plugin_dir, entry="no_such_module_xyz:Backend", plugins=[])
    assert done.returncode == 2
    assert "no_such_module_xyz" in done.stderr and "Traceback" not in done.stderr
    assert seen(tmp_path) == []


def test_without_entries_a_worker_scans_as_before(tmp_path: Path, plugin_dir: Path) -> None:
    """A worker started by hand (no entry, no plugins) finds the installed plugins itself."""
    done = run_worker(tmp_path, plugin_dir)
    assert done.returncode == EXIT_DRAINED, done.stderr
    [started] = seen(tmp_path)
    assert "importlib.metadata" in started["modules"]  # type: ignore[operator]


def test_a_worker_told_no_plugins_loads_none(tmp_path: Path, plugin_dir: Path) -> None:
    """The list is the whole truth: the probe is registered, but the pool did not name it."""
    done = run_worker(tmp_path, plugin_dir, entry=SQLITE_ENTRY, plugins=[])
    assert done.returncode == EXIT_DRAINED, done.stderr
    assert seen(tmp_path) == []


def test_skunq_work_hands_its_workers_the_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `skunq work` builds: the backend's entry point value and every registered plugin."""
    from click.testing import CliRunner

    from skunkqueue import cli

    captured: list[WorkerConfig] = []

    class FakePool:
        def __init__(self, config: WorkerConfig, *args: object, **kwargs: object) -> None:
            captured.append(config)

        def run(self) -> int:
            return 0

    monkeypatch.setattr(cli, "WorkerPool", FakePool)
    result = CliRunner().invoke(cli.main, ["work", "-q", "startup", "-r", "r", "--url", str(tmp_path / "q.db")])
    assert result.exit_code == 0, result.output
    [config] = captured
    assert config.entry == SQLITE_ENTRY
    assert config.plugins is not None and ["web", "skunkqueue_web.plugin"] in config.plugins
