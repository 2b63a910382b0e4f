"""The package's layers: every import inside gmcompress points down the layer order of docs/design.md section 5,
and no two modules (or packages) import each other, directly or through others. Imports are read with ``ast``
from the source, those inside functions and under ``TYPE_CHECKING`` too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gmcompress"
DESIGN = ROOT / "docs" / "design.md"


def layer_order() -> list[str]:
    """The units of gmcompress (subpackages and top-level modules), bottom to top, as design.md section 5 lists
    them on its ``Layers, bottom to top:`` line (the one place the order is written)."""
    line = next(ln for ln in DESIGN.read_text().splitlines() if ln.startswith("Layers, bottom to top:"))
    return re.findall(r"`([\w.]+)`", line)


def module_name(path: Path) -> str:
    """``planning.handlers``, ``nn`` (a package's ``__init__``), ``__init__`` (the package root)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def exists(module: str) -> bool:
    base = PACKAGE.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imported_modules(path: Path) -> set[str]:
    """The gmcompress modules ``path`` imports (``from .a import b`` names ``a.b`` when that is a module)."""
    own = module_name(path)
    package = [] if own == "__init__" else own.split(".") if is_package(path) else own.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] + ([node.module] if node.module else [])
                target = ".".join(base)
            elif (node.module or "").split(".")[0] == "gmcompress":
                target = node.module.removeprefix("gmcompress").lstrip(".")
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if exists(sub) else target or "__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("gmcompress."):
                    found.add(alias.name.removeprefix("gmcompress."))
    return found - {own}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p) for p in sorted(PACKAGE.rglob("*.py"))}


def unit(module: str) -> str:
    """The layer unit of a module: its top-level package or module under gmcompress."""
    return module.split(".")[0]


def test_every_unit_of_the_package_has_a_layer():
    order = layer_order()
    units = {unit(m) for m in import_graph()}
    assert sorted(units - set(order)) == [], "add the new module or package to design.md section 5's layer line"
    assert sorted(set(order) - units) == [], "design.md section 5 names a layer that no longer exists"


def test_imports_point_down_the_layers():
    order = layer_order()
    upward = [
        f"{source} imports {target} ({unit(target)} is above {unit(source)})"
        for source, targets in import_graph().items()
        for target in sorted(targets)
        if unit(source) != unit(target) and order.index(unit(target)) > order.index(unit(source))
    ]
    assert upward == []


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the list of its nodes (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_no_import_cycle_between_modules():
    assert find_cycle(import_graph()) is None


def test_no_import_cycle_between_packages():
    units: dict[str, set[str]] = {}
    for source, targets in import_graph().items():
        units.setdefault(unit(source), set()).update(unit(t) for t in targets if unit(t) != unit(source))
    assert find_cycle(units) is None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
