"""Core depends on no backend: the seed's ``skunkqueue.persistence.<backend>`` paths go through the entry point."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from skunkqueue import backends

CORE = Path(__file__).resolve().parents[2] / "skunkqueue-core" / "src" / "skunkqueue"
# The other distributions' packages and their drivers: none may appear in a core import.
FOREIGN = {"skunkqueue_redis", "skunkqueue_mongo", "skunkqueue_fdb", "skunkqueue_postgres", "skunkqueue_web",
           "redis", "pymongo", "bson", "fdb", "psycopg"}
SEED_PATHS = {"redis": "skunkqueue_redis", "mongodb": "skunkqueue_mongo", "fdb": "skunkqueue_fdb"}


def _imported_top_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def test_no_core_module_imports_a_backend_package_or_driver() -> None:
    modules = sorted(CORE.rglob("*.py"))
    assert len(modules) > 30  # the walk really found the core sources
    offenders = {str(p.relative_to(CORE)): sorted(_imported_top_names(p) & FOREIGN) for p in modules}
    assert {p: names for p, names in offenders.items() if names} == {}


def test_the_seed_paths_import_no_driver_and_give_each_backends_own_default_cfg() -> None:
    # A fresh interpreter: this one has long since imported the drivers through other tests.
    script = (
        "import json, sys\n"
        "from skunkqueue.persistence.redis import default_cfg as redis_cfg\n"
        "from skunkqueue.persistence.mongodb import default_cfg as mongo_cfg\n"
        "from skunkqueue.persistence.fdb import default_cfg as fdb_cfg\n"
        "import skunkqueue_redis, skunkqueue_mongo, skunkqueue_fdb\n"
        "print(json.dumps({'same': [redis_cfg == skunkqueue_redis.default_cfg,\n"
        "                           mongo_cfg == skunkqueue_mongo.default_cfg,\n"
        "                           fdb_cfg == skunkqueue_fdb.default_cfg],\n"
        "                  'drivers': sorted({m.partition('.')[0] for m in sys.modules}\n"
        "                                    & {'redis', 'pymongo', 'fdb'})}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("SKUNQ_BACKEND", "SKUNQ_URL", "SKUNQ_DB")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"same": [True, True, True], "drivers": []}


def test_importing_a_seed_shim_imports_nothing_of_its_backend() -> None:
    script = ("import sys, skunkqueue.persistence.redis, skunkqueue.persistence.mongodb, skunkqueue.persistence.fdb\n"
              "print(sorted(m for m in sys.modules if m.startswith(('skunkqueue_', 'redis', 'pymongo', 'fdb'))))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_seed_path_names_the_backend_class_through_the_entry_point() -> None:
    import skunkqueue.persistence.redis as seed

    assert seed.RedisPersistence is backends.load("redis")


@pytest.mark.parametrize("backend", sorted(SEED_PATHS))
def test_a_missing_backend_fails_the_seed_import_with_one_line_naming_the_distribution(
        backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "_entry_points", lambda: {})  # as if the distribution were not installed
    with pytest.raises(ImportError) as caught:
        exec(f"from skunkqueue.persistence.{backend} import default_cfg", {})
    assert str(caught.value) == (f"The {backend} backend is not installed: "
                                 f"pip install {backends.KNOWN_DISTRIBUTIONS[backend]}")


def test_an_unknown_name_on_a_seed_path_is_an_attribute_error() -> None:
    import skunkqueue.persistence.fdb as seed

    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        seed.nothing_here  # noqa: B018
