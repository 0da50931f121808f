"""Everything a build checks before reading any tensor data: the recipe, the
inputs' headers, architectures, output safety and the per-key plan (`validate`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sdrecipe.arch.detect import Architecture, detect
from sdrecipe.errors import RecipeError
from sdrecipe.graph import MergeGraph, build_graph
from sdrecipe.guard import check_outputs
from sdrecipe.io.diffusers_writer import TOKENIZERS
from sdrecipe.io.readers import ModelReader, open_model
from sdrecipe.plan import BuildPlan, make_plan
from sdrecipe.recipe import Recipe, load_recipe


@dataclass(frozen=True)
class Prepared:
    """A recipe checked against its input files' headers, ready to build."""

    recipe: Recipe
    graph: MergeGraph
    readers: dict[str, ModelReader]
    plan: BuildPlan
    architectures: dict[str, Architecture]


def open_inputs(graph: MergeGraph) -> dict[str, ModelReader]:
    """Open (headers only) every input the selected outputs depend on."""
    recipe = graph.recipe
    needed: dict[str, None] = {}
    for name in graph.outputs:
        needed.update(dict.fromkeys(graph.output_inputs(name)))
    readers = {}
    for name in needed:
        spec = recipe.inputs[name]
        if not spec.path.exists():
            raise RecipeError(f"input {name!r}: {spec.path} does not exist", recipe.path, spec.line)
        try:
            readers[name] = open_model(spec.path)
        except RecipeError as exc:
            raise RecipeError(f"input {name!r}: {exc}", recipe.path, spec.line) from None
    return readers


def prepare(
    recipe_path: Path,
    selected: Iterable[str] | None = None,
    force: bool = False,
    cache_root: Path | None = None,
) -> Prepared:
    """Load and check everything a build needs, without reading tensor data.

    Operands of different architectures are refused unless `force` (or the
    node's `force: true`) says the per-key merge is meant. Outputs that would
    replace an input, the recipe, its lock, another output or anything in
    `cache_root` are refused (see `sdrecipe.guard`).
    """
    return prepare_recipe(load_recipe(recipe_path), selected, force, cache_root)


def prepare_recipe(
    recipe: Recipe,
    selected: Iterable[str] | None = None,
    force: bool = False,
    cache_root: Path | None = None,
) -> Prepared:
    """`prepare` for a recipe already loaded."""
    graph = build_graph(recipe, selected)
    check_outputs(recipe, cache_root, graph.outputs)
    readers = open_inputs(graph)
    architectures = {name: detect(r.infos(), r.metadata) for name, r in readers.items()}
    if not force:
        check_architectures(graph, architectures)
    for name in graph.outputs:
        output = recipe.outputs[name]
        base = graph.base_input(output.node)
        if output.format == "diffusers" and architectures[base].family == "unknown":
            raise RecipeError(
                f"output {name!r}: a diffusers folder needs a known architecture, and "
                f"{base} is {architectures[base].describe()}",
                recipe.path,
                output.line,
            )
    plan = make_plan(
        graph,
        {name: reader.infos() for name, reader in readers.items()},
        {name: architecture.family for name, architecture in architectures.items()},
    )
    return Prepared(recipe, graph, readers, plan, architectures)


def check_architectures(graph: MergeGraph, architectures: Mapping[str, Architecture]) -> None:
    """Refuse a node whose inputs are of different known families."""
    recipe = graph.recipe
    for node in graph.order:
        if recipe.nodes[node].force:
            continue
        families = {
            leaf: architectures[leaf].family
            for leaf in graph.inputs_of(node)
            if architectures[leaf].family != "unknown"
        }
        if len(set(families.values())) > 1:
            described = ", ".join(
                f"{leaf} is {architectures[leaf].describe()}" for leaf in families
            )
            raise RecipeError(
                f"node {node!r} mixes architectures ({described}); a per-key merge of "
                "different architectures gives a broken model. If you mean it, set "
                "`force: true` on the node or build with --force",
                recipe.path,
                recipe.nodes[node].line,
            )


def tokenizer_folders(prepared: Prepared, output: str) -> dict[str, Path]:
    """The tokenizer folders a diffusers output copies: those of the first
    diffusers-folder input it depends on (the base first) that has any."""
    for leaf in prepared.graph.output_inputs(output):
        folder = prepared.recipe.inputs[leaf].path
        found = {name: folder / name for name in TOKENIZERS if (folder / name).is_dir()}
        if found:
            return found
    return {}
