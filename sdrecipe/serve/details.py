"""The data behind the web view's panels, as JSON-ready dicts: a node of a
recipe's DAG, a model file (inspect and lineage), a heatmap of outputs
against their base, and a sweep's table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdrecipe.cache.store import Cache
from sdrecipe.errors import RecipeError
from sdrecipe.plan.status import NodeStatus
from sdrecipe.recipe import Recipe
from sdrecipe.recipe.expr import Call, PerKey, Ref, format_expression, format_value, walk
from sdrecipe.recipe.lock import read_lock
from sdrecipe.serve.workspace import Snapshot

COMPONENT_MEASURE = "relative_l2"


def node_detail(snapshot: Snapshot, file: str, vertex: str) -> dict[str, Any]:
    """What a vertex of a recipe's graph is (`input:A`, `node:x`, `output:y`):
    its expression, methods and parameters (per-key and block values as
    tables), its status and plan, and for an input its file, family and hash."""
    recipe = snapshot.recipe(file)
    kind, _, name = vertex.partition(":")
    statuses = {status.node: status for status in snapshot.statuses.get(recipe.path, ())}
    if kind == "input" and name in recipe.inputs:
        return _input_detail(recipe, name)
    if kind == "node" and name in recipe.nodes:
        return _node_detail(recipe, name, statuses.get(name))
    if kind == "output" and name in recipe.outputs:
        spec = recipe.outputs[name]
        detail = _node_detail(recipe, spec.node, statuses.get(spec.node))
        return {
            **detail,
            "kind": "output",
            "name": name,
            "path": str(spec.path),
            "exists": spec.path.exists(),
            "format": spec.format,
            "dtype": spec.dtype,
            "variables": dict(spec.variables),
        }
    raise RecipeError(f"{file} has no {vertex!r}")


def _node_detail(recipe: Recipe, name: str, status: NodeStatus | None) -> dict[str, Any]:
    node = recipe.nodes[name]
    calls = []
    for part in walk(node.expr):
        if not isinstance(part, Call):
            continue
        parameters = []
        for key, value in part.params:
            table = [list(entry) for entry in value.entries] if isinstance(value, PerKey) else None
            shown = (value.source or "per key") if table is not None else format_value(value)
            parameters.append({"name": key, "value": shown, "table": table})
        calls.append(
            {
                "method": part.method,
                "models": [format_expression(argument) for argument in part.args],
                "parameters": parameters,
            }
        )
    return {
        "kind": "node",
        "name": name,
        "line": node.line,
        "expression": format_expression(node.expr),
        "selection": node.selection.describe(),
        "calls": calls,
        "operands": sorted({part.name for part in walk(node.expr) if isinstance(part, Ref)}),
        "status": str(status.status) if status else None,
        "reason": status.reason if status else None,
        "caching": status.caching if status else None,
    }


def _input_detail(recipe: Recipe, name: str) -> dict[str, Any]:
    spec = recipe.inputs[name]
    detail: dict[str, Any] = {
        "kind": "input",
        "name": name,
        "line": spec.line,
        "path": str(spec.path),
        "url": spec.url,
        "exists": spec.path.exists(),
        "space": spec.space,
        "family": None,
        "variant": None,
        "sha256": spec.sha256,
    }
    lock = read_lock(recipe.path)
    locked = lock.inputs.get(name) if lock else None
    if locked is not None and spec.path.exists() and spec.path.stat().st_size == locked.size:
        detail["sha256"] = detail["sha256"] or locked.sha256
    if spec.path.exists():
        detail.update(_family(spec.path))
    return detail


def _family(path: Path) -> dict[str, Any]:
    """The family and variant a model's header says, or an adapter's family."""
    from sdrecipe.cli.init_wizard import detect_file
    from sdrecipe.io.adapter_files import is_adapter_path

    adapter = is_adapter_path(path)
    found = detect_file(path, adapter)
    space = "difference (an adapter)" if adapter else "model"
    return {"family": found.family, "variant": found.variant, "space": space}


def inspect_file(path: Path, cache_dir: Path) -> dict[str, Any]:
    """`sdrecipe inspect` of a model or adapter, with its lineage tree."""
    from sdrecipe.io.adapter_files import is_adapter_path
    from sdrecipe.views.lineage import model_lineage
    from sdrecipe.views.lineage import to_json as lineage_json
    from sdrecipe.views.model_report import inspect_adapter, inspect_model

    cache = Cache.existing(cache_dir)
    if is_adapter_path(path):
        return inspect_adapter(path, cache, None)
    import json

    report = inspect_model(path, cache)
    report["lineage_tree"] = json.loads(lineage_json(model_lineage(path, cache)))
    return report


def base_of(recipe: Recipe, output: str) -> str:
    """The input an output is compared with: the first model input its node
    reads (the left-most operand, as in `A + (B - C)` or `weighted_sum(A, B)`)."""
    if output not in recipe.outputs:
        raise RecipeError(f"{recipe.path.name} has no output {output!r}")
    pending = [recipe.outputs[output].node]
    while pending:
        name = pending.pop(0)
        if name in recipe.inputs:
            if recipe.inputs[name].space != "difference":
                return name
            continue
        if name in recipe.nodes:  # depth first, left to right
            pending[:0] = [p.name for p in walk(recipe.nodes[name].expr) if isinstance(p, Ref)]
    raise RecipeError(f"output {output!r} reads no model input to compare it with")


def diff_against_base(
    recipe: Recipe, outputs: list[str], base: str | None
) -> tuple[Any, dict[str, Any]]:
    """The diff of the built `outputs` against `base` (an input's name; default
    the first output's base), and its JSON."""
    from sdrecipe.views.model_diff import diff_models

    if not outputs:
        raise RecipeError("name an output to compare")
    for name in outputs:
        if name not in recipe.outputs:
            raise RecipeError(f"{recipe.path.name} has no output {name!r}")
    base = base or base_of(recipe, outputs[0])
    if base not in recipe.inputs:
        raise RecipeError(f"{recipe.path.name} has no input {base!r}")
    built = [recipe.outputs[name].path for name in outputs if recipe.outputs[name].path.exists()]
    if not built:
        raise RecipeError(f"{', '.join(outputs)} not built yet: build it to compare it")
    diff = diff_models(recipe.inputs[base].path, built)
    return diff, {"base": base, **diff.to_dict()}


def sweep_table(recipe: Recipe, distances: bool) -> dict[str, Any]:
    """A `matrix:` recipe's variants: one row per output variant with its
    variables, status and (with `distances`, for built variants) the relative
    L2 distance of each component to the base, read in one pass."""
    variants = {name: spec for name, spec in recipe.outputs.items() if spec.variables}
    if not variants:
        raise RecipeError(f"{recipe.path.name} has no matrix: it is not a sweep")
    variables = list(dict.fromkeys(var for spec in variants.values() for var, _ in spec.variables))
    rows: list[dict[str, Any]] = [
        {
            "output": name,
            "origin": spec.origin,
            "path": str(spec.path),
            "built": spec.path.exists(),
            "variables": dict(spec.variables),
            "distance": {},
        }
        for name, spec in variants.items()
    ]
    components: list[str] = []
    base = base_of(recipe, next(iter(variants)))
    if distances:
        built = [row["output"] for row in rows if row["built"]]
        if built:
            diff, _ = diff_against_base(recipe, built, base)
            by_path = {comparison.path: comparison for comparison in diff.comparisons}
            for row in rows:
                comparison = by_path.get(Path(row["path"]))
                if comparison is None:
                    continue
                row["distance"] = {
                    component: sums.measures()[COMPONENT_MEASURE]
                    for component, sums in comparison.components.items()
                }
                row["distance"]["total"] = comparison.total.measures()[COMPONENT_MEASURE]
                components += [c for c in row["distance"] if c not in components]
    return {
        "recipe": recipe.path.name,
        "base": base,
        "variables": variables,
        "components": components,
        "rows": rows,
    }
