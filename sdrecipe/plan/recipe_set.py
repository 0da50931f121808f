"""Many recipes as one graph: a recipe whose input is another recipe's output
comes after it, so a folder builds in dependency order and a change upstream
reaches every recipe downstream. Each recipe keeps its own lock file.
Imports no torch, so an up-to-date folder build returns at once."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

from sdrecipe.errors import RecipeError
from sdrecipe.io.shard_layout import output_places
from sdrecipe.plan.graph import build_graph
from sdrecipe.plan.status import NodeStatus, Status
from sdrecipe.recipe import Recipe, load_recipe

RECIPE_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Upstream:
    """An input of a recipe that another recipe's output writes."""

    input: str
    recipe: Recipe
    output: str


@dataclass(frozen=True)
class RecipeSet:
    """Recipes in build order, for each the inputs other recipes write, and
    (when loaded to keep going) the recipes that could not be loaded, with why."""

    recipes: tuple[Recipe, ...]
    upstream: dict[Path, tuple[Upstream, ...]]
    broken: dict[Path, RecipeError] = field(default_factory=dict)

    def needs(self, recipe: Recipe) -> tuple[Upstream, ...]:
        return self.upstream[recipe.path]


def recipe_files(arguments: Sequence[Path]) -> list[Path]:
    """The recipe files that `arguments` name: files as given, and each folder's
    `*.yaml` / `*.yml` files in name order."""
    files: list[Path] = []
    for argument in arguments:
        if argument.is_dir():
            found = sorted(p for p in argument.iterdir() if p.suffix in RECIPE_SUFFIXES)
            if not found:
                raise RecipeError("the folder holds no recipe (*.yaml)", argument)
            files += found
        else:
            files.append(argument)
    return list(dict.fromkeys(files))


def load_recipe_set(paths: Sequence[Path], keep_going: bool = False) -> RecipeSet:
    """Load every recipe and order them so that each comes after the recipes
    whose outputs it reads; a cycle names the files and nodes in it. With
    `keep_going`, a recipe that cannot be loaded is set aside in `broken`
    instead of stopping the rest."""
    recipes = []
    broken: dict[Path, RecipeError] = {}
    for path in paths:
        try:
            recipes.append(load_recipe(path))
        except RecipeError as exc:
            if not keep_going:
                raise
            broken[path] = exc
    writers: dict[Path, tuple[Recipe, str]] = {}
    for recipe in recipes:
        for name, output in recipe.outputs.items():
            target = output.path.resolve()
            # Within one recipe, the guard refuses such outputs (see `sdrecipe.plan.guard`).
            if target in writers and writers[target][0] is not recipe:
                other, other_name = writers[target]
                raise RecipeError(
                    f"output {name!r} writes {output.path}, which output {other_name!r} of "
                    f"{other.path} writes too",
                    recipe.path,
                    output.line,
                )
            writers[target] = (recipe, name)
            for place in output_places(output)[1:]:  # a sharded output's index
                writers.setdefault(place.resolve(), (recipe, name))
    dependencies = nx.DiGraph()
    dependencies.add_nodes_from(recipe.path for recipe in recipes)
    upstream: dict[Path, tuple[Upstream, ...]] = {}
    for recipe in recipes:
        found = []
        for name, spec in recipe.inputs.items():
            writer = writers.get(spec.path.resolve())
            if writer is not None and writer[0] is not recipe:
                found.append(Upstream(name, *writer))
                dependencies.add_edge(writer[0].path, recipe.path, link=(writer[1], name))
        upstream[recipe.path] = tuple(found)
    try:
        cycle = nx.find_cycle(dependencies)
    except nx.NetworkXNoCycle:
        cycle = []
    if cycle:
        steps = [
            f"{source} (output {dependencies.edges[source, target]['link'][0]!r}) -> "
            f"{target} (input {dependencies.edges[source, target]['link'][1]!r})"
            for source, target in cycle
        ]
        raise RecipeError("the recipes read each other's outputs in a cycle: " + "; ".join(steps))
    position = {recipe.path: index for index, recipe in enumerate(recipes)}
    by_path = {recipe.path: recipe for recipe in recipes}
    order = nx.lexicographical_topological_sort(dependencies, key=position.__getitem__)
    return RecipeSet(tuple(by_path[path] for path in order), upstream, broken)


def planned_statuses(
    recipe_set: RecipeSet, assess_one: Callable[[Recipe], list[NodeStatus]]
) -> dict[Path, list[NodeStatus]]:
    """Each recipe's node statuses, in build order. An input that an earlier
    recipe will rewrite (its output is not up to date, or not built yet) makes
    every node that uses it rebuild, whatever the file on disk says today."""
    changing: dict[Path, str] = {}
    statuses: dict[Path, list[NodeStatus]] = {}
    for recipe in recipe_set.recipes:
        rewritten = {
            up.input: f"input {up.input} is rebuilt first by {up.recipe.path} ({up.output})"
            for up in recipe_set.needs(recipe)
            if recipe.inputs[up.input].path.resolve() in changing
            or not recipe.inputs[up.input].path.exists()
        }
        graph = build_graph(recipe)
        missing = [name for name in rewritten if not recipe.inputs[name].path.exists()]
        if missing:
            # Not built yet: its header cannot be read, so nothing can be assessed.
            reason = f"not assessed until input {missing[0]} is built"
            found = [NodeStatus(node, Status.REBUILD, reason) for node in graph.order]
        else:
            found = assess_one(recipe)
        output_of = {spec.node: name for name, spec in recipe.outputs.items()}
        for index, status in enumerate(found):
            used = [name for name in rewritten if nx.has_path(graph.dag, name, status.node)]
            if used:
                found[index] = NodeStatus(
                    status.node, Status.REBUILD, rewritten[used[0]], output_of.get(status.node)
                )
        for status in found:
            if status.output is not None and status.status != Status.UP_TO_DATE:
                for place in output_places(recipe.outputs[status.output]):
                    changing[place.resolve()] = status.node
        statuses[recipe.path] = found
    return statuses
