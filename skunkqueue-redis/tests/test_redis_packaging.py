"""The Lua scripts are package data: a wheel without them would fail at the first connect."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from skunkqueue_redis import scripts

ROOT = Path(__file__).resolve().parents[2]


def test_every_script_ships_in_the_wheel(tmp_path: Path) -> None:
    # A copy, so that no build/ folder left from an earlier build can supply the files.
    source = shutil.copytree(ROOT / "skunkqueue-redis", tmp_path / "src",
                             ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                            "--disable-pip-version-check", "-w", str(tmp_path), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = tmp_path.glob("skunkqueue_redis-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f"skunkqueue_redis/scripts/{name}.lua" for name in (*scripts.NEEDS, "common")}
    assert wanted <= names, wanted - names


def test_every_script_names_its_keys_and_arguments() -> None:
    for name in (*scripts.NEEDS, "common"):
        source = scripts.read(name)
        assert "ARGV" in source.split("local function", 1)[0] or name == "common", name
        if name != "common":
            head = source.split("local function", 1)[0]
            assert "-- KEYS:" in head and "-- ARGV:" in head, name
