"""The package's shape: imports point down the data flow, no private names cross modules, and the
README's API tables name things that exist.

Layers, lowest first (a module may import its own layer or lower ones, never a higher one; imports
inside one layer must not form a cycle). Every import counts: module level, inside functions and
under TYPE_CHECKING alike.

    0 errors
    1 the other top-level modules (data, checkpoints, examples, small utilities)
    2 store/       3 gradients/       4 analysis/       5 interface       6 methods/       7 __init__
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "tracin_engine"
RANK = {"errors": 0, "store": 2, "gradients": 3, "analysis": 4, "interface": 5, "methods": 6, "__init__": 7}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def rank(module: str) -> int:
    """Layer of a module inside tracin_engine ('tracin_engine.store.scoring' -> 2)."""
    parts = module.split(".")
    if len(parts) == 1:
        return RANK["__init__"]
    return RANK.get(parts[1], 1)


def engine_modules() -> dict[str, Path]:
    return {module_name(p): p for p in ENGINE.rglob("*.py")}


def imports_of(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import statement in the file."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            if not node.module:  # "from . import x": x is a module
                out += [(f"{target}.{n}", [], node.lineno) for n in names]
            else:
                out.append((target, names, node.lineno))
    return out


def resolve(target: str, modules: dict[str, Path]) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def test_engine_imports_point_down_the_flow_only():
    modules = engine_modules()
    upward, graph = [], {m: set() for m in modules}
    for mod, path in modules.items():
        for target, _, line in imports_of(path, mod):
            if target.startswith("tracin_widgets"):
                upward.append(f"{path.relative_to(ROOT)}:{line} imports the widgets")
            if not target.startswith("tracin_engine"):
                continue
            dest = resolve(target, modules)
            if dest is None or dest == mod:
                continue
            if rank(dest) > rank(mod):
                upward.append(f"{path.relative_to(ROOT)}:{line} ({mod}, layer {rank(mod)}) imports {dest} "
                              f"(layer {rank(dest)})")
            elif rank(dest) == rank(mod) and dest != "tracin_engine":
                graph[mod].add(dest)
    assert upward == []
    # no cycle among same-layer imports (depth-first search)
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail + [m, d]))
            if d not in state:
                visit(d, trail + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_the_rule_is_live():
    """The checker sees an upward import when there is one (so the test above can fail)."""
    fake = ENGINE / "store" / "scoring.py"
    names = [t for t, _, _ in imports_of(fake, "tracin_engine.store.scoring")]
    assert "tracin_engine.store.layout" in names
    assert rank("tracin_engine.methods.index") > rank("tracin_engine.store.scoring")
    assert rank("tracin_engine.data") == 1 and rank("tracin_engine.errors") == 0


def private_names_defined(path: Path) -> set[str]:
    """_names a module defines: functions, classes, module globals and self._attributes."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
    return {n for n in out if n.startswith("_") and not n.startswith("__")}


def test_no_private_names_cross_modules():
    """No engine module imports or reaches into a _name that another engine module defines
    (self._x inherited from a base class is the class's own business)."""
    modules = engine_modules()
    defined = {mod: private_names_defined(path) for mod, path in modules.items()}
    bad = []
    for mod, path in modules.items():
        others = set().union(*(d for m, d in defined.items() if m != mod)) - defined[mod]
        for target, names, line in imports_of(path, mod):
            if target.startswith("tracin_engine"):
                bad += [f"{path.relative_to(ROOT)}:{line} imports {target}.{n}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in others
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} uses .{node.attr} (defined in another module)")
    assert bad == []


def test_widgets_use_the_engine_through_its_public_api():
    bad = []
    for path in (ROOT / "tracin_widgets").rglob("*.py"):
        for target, names, line in imports_of(path, module_name(path)):
            if target.startswith("tracin_engine.") and target not in ("tracin_engine.data", "tracin_engine.errors"):
                if path.name != "_engine.py":
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert bad == []


def readme_api_names() -> list[str]:
    """Every `te.X` / `tw.X` (with dotted attributes) written in the README's API tables."""
    text = (ROOT / "README.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("|")]
    found = set()
    for row in rows:
        for m in re.finditer(r"`(t[ew](?:\.[A-Za-z_][A-Za-z0-9_]*)+)", row):
            found.add(m.group(1))
    return sorted(found)


def test_readme_api_tables_name_things_that_exist():
    import tracin_engine as te
    import tracin_widgets as tw

    names = readme_api_names()
    assert len(names) >= 10, names
    missing = []
    for name in names:
        obj = {"te": te, "tw": tw}[name.split(".")[0]]
        for attr in name.split(".")[1:]:
            if not hasattr(obj, attr):
                missing.append(name)
                break
            obj = getattr(obj, attr)
    assert missing == []


def test_every_index_kind_declares_the_interface():
    import tracin_engine as te

    for cls in (te.GradientIndex, te.SourceIndex, te.EnsembleIndex):
        for name in ("n_train", "n_checkpoints", "learning_rates", "test_features", "influence",
                     "influence_per_checkpoint", "top_k", "similarity", "self_influence",
                     "self_influence_per_checkpoint", "outliers", "renormalized_top_k", "cluster", "save"):
            assert hasattr(cls, name), f"{cls.__name__} lacks {name}"
