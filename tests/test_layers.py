"""The import graph, read from the source: no circle among module-level imports, and no arrow up the SPEC's
layers (graph <- criteria <- thresholds <- methods <- pipeline and report <- compare <- cli), so the code stays
changeable one layer at a time."""

from __future__ import annotations

import ast
from pathlib import Path

import prunekit

ROOT = Path(prunekit.__file__).parent
# SPEC layers: a module may import its own layer and those below, never one above (lazily neither).
RANK = {"graph": 1, "criteria": 2, "thresholds": 3, "targets": 3, "methods": 4,
        "pipeline": 5, "report": 5, "compare": 6, "cli": 7, "demo": 7}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def _package(name: str, path: Path) -> str:
    """The package a module's relative imports start from."""
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def _from(node: ast.ImportFrom, pkg: str) -> str:
    """The absolute module a ``from ... import`` names (relative ones resolved against ``pkg``)."""
    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
    return ".".join(base + ([node.module] if node.module else []))


def _imports(name: str, path: Path, mods: dict[str, Path], top_only: bool) -> set[str]:
    """prunekit modules ``name`` imports (a package's own module counts only where a name is not a submodule)."""
    pkg = _package(name, path)
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            mod = _from(node, pkg)
            subs = {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods}
            out |= subs if len(subs) == len(node.names) else {mod} | subs
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m in mods and m != name}


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return RANK.get(parts[1]) if len(parts) > 1 else None


def test_no_circle_among_module_level_imports():
    mods = _modules()
    edges = {n: _imports(n, p, mods, top_only=True) for n, p in mods.items()}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in sorted(edges[n]):
            assert state.get(m) != 1, "import circle: " + " -> ".join(path[path.index(m):] + [m]) if m in path \
                else f"import circle through {m}"
            if m not in state:
                visit(m, path + [m])
        state[n] = 2

    for n in sorted(edges):
        if n not in state:
            visit(n, [n])


def test_no_import_goes_up_the_layers():
    mods = _modules()
    up = []
    for n, p in mods.items():
        mine = _layer(n)
        if mine is None:
            continue
        for m in _imports(n, p, mods, top_only=False):
            theirs = _layer(m)
            if theirs is not None and theirs > mine:
                up.append(f"{n} -> {m}")
    assert not up, f"imports up the layers: {sorted(up)}"


def test_every_relative_import_names_a_module_that_exists():
    """A module moved into a package keeps lazy imports like ``from .export import ...`` that now point inside
    the package: caught here, not by the first user who reaches that code path."""
    mods = _modules()
    broken = []
    for n, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                if _from(node, _package(n, p)) not in mods:
                    broken.append(f"{n}:{node.lineno} from {'.' * node.level}{node.module or ''}")
    assert not broken, f"relative imports of modules that do not exist: {broken}"
