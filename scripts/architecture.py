"""The layering of docs/architecture.md, held against the code's own imports.

Reads the tables of parts and distributions from docs/architecture.md and every
``import`` in the sources (inside functions and under ``TYPE_CHECKING`` too),
and says which imports break the rules there. tests/core/test_architecture.py
runs the checks; run as a script it draws the picture:

    python scripts/architecture.py          # docs/architecture.dot and, with graphviz, docs/architecture.png
    python scripts/architecture.py --text   # the arrows between parts, in words
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
CORE = ROOT / "skunkqueue-core" / "src"
PACKAGE = CORE / "skunkqueue"


@dataclass
class Part:
    floor: int
    name: str
    paths: list[str]  # under skunkqueue-core/src/skunkqueue/; "x/" is a folder
    says: str


@dataclass
class Distribution:
    name: str
    package: str
    may_import: list[str]  # parts of the core


@dataclass
class Import:
    source: str       # importing module, dotted
    target: str       # imported module, dotted (the deepest that exists)
    line: int
    in_function: bool
    type_only: bool   # under ``if TYPE_CHECKING:``


@dataclass
class House:
    parts: list[Part]
    distributions: list[Distribution]
    imports: list[Import] = field(default_factory=list)

    def part_of(self, module: str) -> Part | None:
        """The part a core module belongs to (the longest path that holds it), or None."""
        if module == "skunkqueue":
            relative = "__init__"
        elif module.startswith("skunkqueue."):
            relative = module[len("skunkqueue."):].replace(".", "/")
        else:
            return None
        best: tuple[int, Part] | None = None
        for part in self.parts:
            for path in part.paths:
                hit = (relative + ".py" == path or (relative + "/__init__.py") == path
                       or (path.endswith("/") and (relative + "/").startswith(path)))
                if hit and (best is None or len(path) > best[0]):
                    best = (len(path), part)
        return best[1] if best else None


def _table(text: str, marker: str) -> list[list[str]]:
    match = re.search(rf"<!-- {marker}:.*?-->\n(.*?)<!-- /{marker} -->", text, re.S)
    if match is None:
        raise ValueError(f"{DOC}: no table between <!-- {marker}: ... --> and <!-- /{marker} -->")
    rows = [line.strip().strip("|").split("|") for line in match.group(1).splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows[2:]]  # past the header and its rule


def read_house(doc: Path = DOC) -> House:
    text = doc.read_text()
    parts = [Part(int(floor), name, re.findall(r"`([^`]+)`", paths), says)
             for floor, name, paths, says in _table(text, "parts")]
    distributions = [Distribution(name, package.strip("`"), may.split())
                     for name, package, may in _table(text, "distributions")]
    return House(sorted(parts, key=lambda p: p.floor), distributions)


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _exists(module: str, roots: list[Path]) -> bool:
    rel = Path(*module.split("."))
    return any((root / rel).with_suffix(".py").exists() or (root / rel / "__init__.py").exists() for root in roots)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def read_imports(src: Path, roots: list[Path]) -> list[Import]:
    """Every import of a SkunkQueue module in the package(s) under ``src``."""
    found: list[Import] = []
    for path in sorted(src.rglob("*.py")):
        if ".egg-info" not in str(path):
            found += _imports_of(path, src, roots)
    return found


def _imports_of(path: Path, src: Path, roots: list[Path]) -> list[Import]:
    module = _module_name(path, src)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True, type_only)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit_stmt(stmt, in_function, True)
                for stmt in child.orelse:
                    visit_stmt(stmt, in_function, type_only)
            else:
                visit_stmt(child, in_function, type_only)

    def visit_stmt(node: ast.AST, in_function: bool, type_only: bool) -> None:
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # ``from pkg import module`` imports the module; ``from module import name`` the module.
            targets = [f"{origin}.{a.name}" if _exists(f"{origin}.{a.name}", roots) else origin for a in node.names]
        else:
            visit(node, in_function, type_only)
            return
        for target in dict.fromkeys(targets):
            if target.split(".")[0].startswith("skunkqueue") and target != module:
                found.append(Import(module, target, getattr(node, "lineno", 0), in_function, type_only))

    visit(ast.parse(path.read_text(), str(path)), False, False)
    return found


def distribution_sources() -> dict[str, Path]:
    """Each distribution's package folder, by package name."""
    return {pkg.name: pkg for pkg in sorted(ROOT.glob("skunkqueue-*/src/skunkqueue_*"))
            if pkg.is_dir() and pkg.name.isidentifier()}  # not the .egg-info beside it


def core_modules() -> list[str]:
    return sorted(_module_name(p, CORE) for p in PACKAGE.rglob("*.py"))


def circles(imports: list[Import]) -> list[set[str]]:
    """Groups of two or more modules that import each other in a loop (Tarjan's strongly connected components)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        graph[imp.source].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    counter = [0]

    def connect(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.add(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(group)

    for node in list(graph):
        if node not in index:
            connect(node)
    return found


def part_arrows(house: House, imports: list[Import]) -> Counter[tuple[str, str]]:
    """(importing part, imported part) -> how many imports, between different parts of the core."""
    arrows: Counter[tuple[str, str]] = Counter()
    for imp in imports:
        source, target = house.part_of(imp.source), house.part_of(imp.target)
        if source and target and source is not target:
            arrows[(source.name, target.name)] += 1
    return arrows


def dot_source(house: House, core_imports: list[Import], outside: dict[str, list[Import]]) -> str:
    floors = {part.name: part.floor for part in house.parts}
    lines = ["digraph skunkqueue {", '  graph [rankdir=TB, fontname="Helvetica", nodesep=0.35, ranksep=0.45];',
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=11, fillcolor="#eef3fb"];',
             '  edge [fontname="Helvetica", fontsize=9, color="#4a6fa5"];',
             '  subgraph cluster_core { label="skunkqueue-core (a part may import only the floors below it)";'
             ' fontname="Helvetica"; fontsize=12; color="#9aa9c0";']
    for part in reversed(house.parts):
        modules = " ".join(p.replace(".py", "") for p in part.paths)
        wrapped = "\\n".join(re.findall(r"\S.{0,42}(?=\s|$)", modules))
        lines.append(f'    {part.name} [label="{part.floor}  {part.name}\\n{wrapped}"];')
    lines.append("  }")
    # Distributions under the same rule are one box: their arrows would only repeat each other.
    groups: dict[tuple[str, ...], list[Distribution]] = defaultdict(list)
    for dist in house.distributions:
        groups[tuple(dist.may_import)].append(dist)
    group_nodes = []
    for number, (rule, members) in enumerate(groups.items()):
        node = f"outside{number}"
        group_nodes.append(node)
        names = "\\n".join(d.name for d in members)
        lines.append(f'  {node} [label="{names}\\n(may import: {" ".join(rule)})", fillcolor="#fdf1e0"];')
    lines.append(f'  {{ rank=same; {"; ".join(group_nodes)}; }}')
    for (source, target), count in sorted(part_arrows(house, core_imports).items()):
        up = floors[target] > floors[source]
        colour = ', color="#c0392b", penwidth=2' if up else ""
        lines.append(f'  {source} -> {target} [label="{count}"{colour}];')
    for node, members in zip(group_nodes, groups.values()):
        targets = Counter(p.name for dist in members for imp in outside.get(dist.package, [])
                          if (p := house.part_of(imp.target)) is not None)
        for target, count in sorted(targets.items()):
            lines.append(f'  {node} -> {target} [label="{count}", style=dashed, color="#b9770e"];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    house = read_house()
    core_imports = read_imports(CORE, [CORE])
    roots = [CORE, *(p.parent for p in distribution_sources().values())]
    outside = {name: read_imports(path.parent, roots) for name, path in distribution_sources().items()}
    outside = {name: [i for i in imps if i.target.startswith("skunkqueue") and not i.target.startswith(name)]
               for name, imps in outside.items()}
    if "--text" in argv:
        floors = {part.name: part.floor for part in house.parts}
        for (source, target), count in sorted(part_arrows(house, core_imports).items(),
                                              key=lambda item: (-floors[item[0][0]], -floors[item[0][1]])):
            up = "  UP A FLOOR" if floors[target] > floors[source] else ""
            print(f"{source} -> {target}: {count} import(s){up}")
        return 0
    dot = DOC.with_suffix(".dot")
    dot.write_text(dot_source(house, core_imports, outside))
    print(f"wrote {dot.relative_to(ROOT)}")
    if shutil.which("dot") is None:
        print("graphviz's dot is not installed (apt-get install graphviz): the picture was not drawn")
        return 1
    png = DOC.with_suffix(".png")
    subprocess.run(["dot", "-Tpng", "-Gdpi=110", str(dot), "-o", str(png)], check=True)
    print(f"wrote {png.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
