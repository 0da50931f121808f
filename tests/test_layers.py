"""The package's shape: layers import only downwards, no import cycle (counting
imports inside functions), a short top level and no module over 600 lines.

    cli, serve → api → engine, views → plan
        → recipe, cache, io, adapters, methods, arch → errors, text
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "sdrecipe"
# Highest first: a module may import its own layer and those below it.
LAYERS = (
    ("cli", "__main__", "serve"),
    ("api",),
    ("engine", "views", "synthetic"),
    ("plan",),
    ("recipe", "cache", "io", "adapters", "methods", "arch"),
    ("errors", "text", ""),
)
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(path): path for path in PACKAGE.rglob("*.py")}


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """Imports under `if TYPE_CHECKING:`, which never run."""
    guarded: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            guarded.update(child for part in node.body for child in ast.walk(part))
    return guarded


def _imports(module: str, source: str | None = None) -> set[str]:
    """The sdrecipe modules `module` imports anywhere, functions included."""
    tree = ast.parse(MODULES[module].read_text() if source is None else source)
    skipped = _type_checking_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sdrecipe"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "sdrecipe")
    found.discard(module)
    return found


GRAPH = nx.DiGraph((module, target) for module in MODULES for target in _imports(module))


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    assert top in RANK, f"{module} belongs to no layer: add it to LAYERS in {__file__}"
    return RANK[top]


def test_layers_import_only_downwards():
    upward = [
        f"{module} imports {target}"
        for module, target in GRAPH.edges
        if _layer(target) < _layer(module)
    ]
    assert upward == []


def test_no_import_cycle():
    cycles = [" -> ".join(cycle) for cycle in nx.simple_cycles(GRAPH, length_bound=8)]
    assert cycles == []


def test_top_level_is_short_and_modules_are_small():
    top = [path.name for path in PACKAGE.glob("*.py")]
    assert len(top) <= 12, top
    long = {
        module: lines
        for module, path in MODULES.items()
        if (lines := len(path.read_text().splitlines())) > 600
    }
    assert long == {}


def test_the_rule_sees_imports_inside_functions_but_not_type_checking_ones():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from sdrecipe.api import BuildReport\n"
        "def late():\n    from sdrecipe.engine.builder import update_outputs\n"
        "    import sdrecipe.cli\n"
    )
    found = _imports("sdrecipe.plan.guard", source)
    assert found == {"sdrecipe.engine.builder", "sdrecipe.cli"}
    assert _layer("sdrecipe.cli") < _layer("sdrecipe.api") < _layer("sdrecipe.plan.assess")
