"""docs/architecture.md holds: no import runs up a floor, no circle, no import hidden in a function
without a reason. The parts and the rules are read from the document itself (scripts/architecture.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("architecture", ROOT / "scripts" / "architecture.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["architecture"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


arch = _load()

# Imports of SkunkQueue modules inside functions, each with its reason. Any other one fails:
# an import hidden in a function to dodge a cycle is a cycle all the same.
IMPORTS_IN_FUNCTIONS = {
    ("skunkqueue.worker_main", "skunkqueue.async_worker"): "a worker of sync jobs never loads asyncio",
    ("skunkqueue.command", "skunkqueue.cli"): "the fork server is forked before the command line is imported",
    ("skunkqueue.queue", "skunkqueue.periodic"): "a producer that declares no schedule never loads cronsim",
    ("skunkqueue.testing", "skunkqueue.testing.suite"): "the kit's lazy attributes: importing it loads no pytest",
    ("skunkqueue.testing.suite_periodic", "skunkqueue.testing.periodic_retention"):
        "that job module is imported in the test, as a worker imports it",
}


@pytest.fixture(scope="module")
def house() -> object:
    return arch.read_house()


@pytest.fixture(scope="module")
def core_imports() -> list[object]:
    return arch.read_imports(arch.CORE, [arch.CORE])


def test_the_document_names_parts_on_distinct_floors(house: object) -> None:
    floors = [part.floor for part in house.parts]  # type: ignore[attr-defined]
    assert len(floors) >= 5 and sorted(floors) == list(range(1, len(floors) + 1))
    assert {d.package for d in house.distributions} == set(arch.distribution_sources())  # type: ignore[attr-defined]


def test_every_core_module_belongs_to_a_part(house: object) -> None:
    homeless = [m for m in arch.core_modules() if house.part_of(m) is None]  # type: ignore[attr-defined]
    assert homeless == [], f"add these modules to a part in docs/architecture.md: {homeless}"


def test_no_import_runs_up_a_floor(house: object, core_imports: list[object]) -> None:
    up = []
    for imp in core_imports:
        source, target = house.part_of(imp.source), house.part_of(imp.target)  # type: ignore[attr-defined]
        assert source is not None and target is not None, imp
        if target.floor > source.floor:
            up.append(f"{imp.source}:{imp.line} imports {imp.target} ({source.name} on floor {source.floor} "
                      f"-> {target.name} on floor {target.floor})")
    assert up == [], "\n".join(up)


def test_no_circle(core_imports: list[object]) -> None:
    assert arch.circles(core_imports) == []


def test_imports_inside_functions_have_a_reason(core_imports: list[object]) -> None:
    hidden = {(imp.source, imp.target) for imp in core_imports if imp.in_function}  # type: ignore[attr-defined]
    unexplained = sorted(hidden - set(IMPORTS_IN_FUNCTIONS))
    assert unexplained == [], f"imports inside functions with no reason in IMPORTS_IN_FUNCTIONS: {unexplained}"


def test_the_pools_roles_stand_on_their_table_alone(core_imports: list[object]) -> None:
    """docs/architecture.md, inside the pool part: only WorkerPool imports the roles (no role another),
    and the scheduler fires through a callable, never holding a SkunkQueue."""
    roles = {f"skunkqueue.pool.{role}" for role in ("supervisor", "leases", "upkeep", "scheduler")}
    assert all(arch.core_modules().count(role) == 1 for role in roles), "a role's module was renamed: say so here"
    crossing = [f"{imp.source}:{imp.line} imports {imp.target}" for imp in core_imports  # type: ignore[attr-defined]
                if imp.source.startswith("skunkqueue.pool.")  # type: ignore[attr-defined]
                and (imp.target in roles or imp.target == "skunkqueue.pool")]  # type: ignore[attr-defined]
    queue = [f"{imp.source}:{imp.line} imports {imp.target}" for imp in core_imports  # type: ignore[attr-defined]
             if imp.source == "skunkqueue.pool.scheduler"  # type: ignore[attr-defined]
             and imp.target in ("skunkqueue", "skunkqueue.queue")]  # type: ignore[attr-defined]
    assert crossing == [] and queue == [], "\n".join(crossing + queue)


@pytest.mark.parametrize("package", sorted(arch.distribution_sources()))
def test_a_distribution_imports_only_what_it_may(house: object, package: str) -> None:
    rule = next(d for d in house.distributions if d.package == package)  # type: ignore[attr-defined]
    source = arch.distribution_sources()[package]
    roots = [arch.CORE, *(p.parent for p in arch.distribution_sources().values())]
    wrong = []
    imports = arch.read_imports(source.parent, roots)
    own = [imp for imp in imports if imp.target.split(".")[0] == package]
    # e.g. a backend's aio mixin importing helpers back from the persistence class that mixes it in
    assert arch.circles(own) == [], f"{package} imports its own modules in a loop"
    for imp in imports:
        if imp.target.split(".")[0] == package:
            continue
        if imp.target.startswith("skunkqueue_"):
            wrong.append(f"{imp.source}:{imp.line} imports another distribution's {imp.target}")
            continue
        part = house.part_of(imp.target)  # type: ignore[attr-defined]
        if part is None or part.name not in rule.may_import:
            wrong.append(f"{imp.source}:{imp.line} imports {imp.target} ({part.name if part else 'no part'})")
    assert wrong == [], "\n".join(wrong)


def test_the_checks_catch_what_they_are_for(tmp_path: Path, house: object) -> None:
    """The readers see an upward import in a function, under TYPE_CHECKING and relative, and a circle."""
    pkg = tmp_path / "skunkqueue"
    (pkg / "persistence").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "record.py").write_text("def f():\n    from skunkqueue import pool\n")
    (pkg / "pool.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .cli import main\n")
    (pkg / "cli.py").write_text("import skunkqueue.pool\n")
    (pkg / "persistence" / "__init__.py").write_text("from ..errors import X\n")
    (pkg / "errors.py").write_text("")
    found = {(i.source, i.target, i.in_function, i.type_only) for i in arch.read_imports(tmp_path, [tmp_path])}
    assert found == {("skunkqueue.record", "skunkqueue.pool", True, False),
                     ("skunkqueue.pool", "skunkqueue.cli", False, True),
                     ("skunkqueue.cli", "skunkqueue.pool", False, False),
                     ("skunkqueue.persistence", "skunkqueue.errors", False, False)}
    assert arch.circles(arch.read_imports(tmp_path, [tmp_path])) == [{"skunkqueue.pool", "skunkqueue.cli"}]
    assert house.part_of("skunkqueue.persistence.sqlite").name == "store"  # type: ignore[attr-defined]
    assert house.part_of("skunkqueue").name == "jobs"  # type: ignore[attr-defined]
