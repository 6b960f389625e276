"""The package's imports point down, and no two modules import each other (lazy imports inside functions count).

Layers, bottom to top: plug-in loading; the pure parts (objectives, data plane, models, tasks, tracking) and the
config; engines (one process's work); actors (Ray around the engines); stages; the driver; the command line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parents[2] / "pear_ray"
LAYERS = {
    "plugins": 0, "runtime": 0, "hub": 0, "messages": 0, "atomic": 0, "faults": 0, "storage": 0, "forked": 0,
    "objectives": 1, "data": 1, "models": 1,
    "config": 2, "tasks": 2, "environments": 2, "tracking": 2, "rewards": 2,
    "engines": 3,
    "actors": 4,
    "stages": 5,
    "driver": 6,
    "submit": 7, "cli": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """pear_ray modules a file imports, anywhere in it (TYPE_CHECKING-only imports excluded)."""
    tree = ast.parse(path.read_text())
    type_checking = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                     and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pear_ray"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("pear_ray"))
    return found


def graph() -> nx.DiGraph:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    edges = nx.DiGraph()
    for name, path in modules.items():
        for target in imported_modules(path):
            while target not in modules and "." in target:  # `from pear_ray.x import name` -> module pear_ray.x
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                edges.add_edge(name, target)
    return edges


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_import_points_down_or_sideways():
    upward = [f"{source} -> {target}" for source, target in graph().edges
              if layer(source) is not None and layer(target) is not None and layer(target) > layer(source)]
    assert upward == []


def test_no_import_cycles_between_modules():
    """Packages' __init__ files re-export their modules, so they are left out."""
    edges = graph()
    package_inits = {module_name(path) for path in PACKAGE.rglob("__init__.py")}
    assert list(nx.simple_cycles(edges.subgraph(node for node in edges if node not in package_inits))) == []
