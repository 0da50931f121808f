"""The merge DAG over inputs and nodes: validation, order, and lineage."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import networkx as nx

from sdrecipe.errors import RecipeError
from sdrecipe.methods import get_method
from sdrecipe.methods.registry import DIFFERENCE, MODEL, OWN_BYTES
from sdrecipe.recipe import Recipe
from sdrecipe.recipe.expr import Expr, method_calls, references


@dataclass(frozen=True)
class MergeGraph:
    """The nodes that the selected outputs need, in evaluation order."""

    recipe: Recipe
    dag: nx.DiGraph
    order: tuple[str, ...]
    outputs: tuple[str, ...]

    def operands(self, node: str) -> tuple[str, ...]:
        """Inputs and nodes that `node` uses directly, leftmost (the base) first."""
        return self._operands[node]

    def base(self, node: str) -> str:
        """The leftmost operand of `node`, whose keys and dtypes the node keeps."""
        return self._operands[node][0]

    def base_input(self, name: str) -> str:
        """The input at the end of `name`'s chain of bases."""
        return self._base_inputs.get(name, name)

    # Asked for every key of every node while planning: worked out once.
    @cached_property
    def _operands(self) -> dict[str, tuple[str, ...]]:
        return {name: tuple(references(node.expr)) for name, node in self.recipe.nodes.items()}

    @cached_property
    def _base_inputs(self) -> dict[str, str]:
        found = {}
        for name in self.recipe.nodes:
            base = name
            while base in self.recipe.nodes:
                base = self.base(base)
            found[name] = base
        return found

    def inputs_of(self, name: str) -> list[str]:
        """Every input that `name` depends on, in left-to-right order of first use."""
        if name in self.recipe.inputs:
            return [name]
        found: dict[str, None] = {}
        for operand in self.operands(name):
            for leaf in self.inputs_of(operand):
                found.setdefault(leaf)
        return list(found)

    def models_under(self, name: str) -> list[str]:
        """The model inputs that difference `name` is added to: the base input of
        every node that uses it, through nodes whose base is itself a difference.
        Nodes whose base input was not opened (its space unknown: see
        `sdrecipe.recipe.spaces.check_spaces`) are not followed."""
        recipe = self.recipe
        found: dict[str, None] = {}
        pending, seen = [name], {name}
        while pending:
            current = pending.pop()
            for node in self.dag.successors(current):
                if node not in recipe.nodes:
                    continue
                base = self.base_input(node)
                if recipe.inputs[base].space == MODEL:
                    found.setdefault(base)
                elif recipe.inputs[base].space == DIFFERENCE and node not in seen:
                    seen.add(node)
                    pending.append(node)
        return list(found)

    def needed_inputs(self) -> list[str]:
        """Every input the selected outputs depend on, in order of first use."""
        needed: dict[str, None] = {}
        for name in self.outputs:
            needed.update(dict.fromkeys(self.output_inputs(name)))
        return list(needed)

    def output_inputs(self, output: str) -> list[str]:
        """Every input that output `output` depends on: its node's, then its baked VAE."""
        spec = self.recipe.outputs[output]
        leaves = self.inputs_of(spec.node)
        if spec.vae is not None and spec.vae not in leaves:
            leaves.append(spec.vae)
        return leaves


def _variants(recipe: Recipe, selected: Iterable[str]) -> tuple[str, ...]:
    """The selected outputs, a matrix output's name standing for all its variants."""
    names: dict[str, None] = {}
    for name in selected:
        variants = [n for n, output in recipe.outputs.items() if output.origin == name]
        names.update(dict.fromkeys(variants if name not in recipe.outputs and variants else [name]))
    return tuple(names)


def build_graph(recipe: Recipe, selected: Iterable[str] | None = None) -> MergeGraph:
    """Build and check the DAG; keep only what the `selected` outputs (default all)
    need. Reads no input file: the inputs' spaces are not needed here."""
    dag = nx.DiGraph()
    declared = [*recipe.inputs, *recipe.nodes]
    dag.add_nodes_from(declared)
    for node in recipe.nodes.values():
        for operand in references(node.expr):
            dag.add_edge(operand, node.name)
    try:
        cycle = nx.find_cycle(dag)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        names = [edge[0] for edge in cycle] + [cycle[0][0]]
        first = min(names, key=declared.index)
        raise RecipeError(
            f"the nodes form a cycle: {' -> '.join(names)}", recipe.path, recipe.nodes[first].line
        )
    outputs = tuple(recipe.outputs) if selected is None else _variants(recipe, selected)
    for name in outputs:
        if name not in recipe.outputs:
            raise RecipeError(
                f"{name!r} is not an output of this recipe (outputs: {', '.join(recipe.outputs)})",
                recipe.path,
            )
    needed: set[str] = set(outputs)
    for name in outputs:
        needed |= nx.ancestors(dag, name)
    position = {name: index for index, name in enumerate(declared)}
    order = tuple(
        name
        for name in nx.lexicographical_topological_sort(dag, key=position.__getitem__)
        if name in needed and name in recipe.nodes
    )
    return MergeGraph(recipe=recipe, dag=dag, order=order, outputs=outputs)


def device_dependent(expr: Expr) -> bool:
    """Whether `expr` calls a method whose bytes on a device depend on the device class."""
    return any(get_method(name).device == OWN_BYTES for name in method_calls(expr))


def output_device(graph: MergeGraph, output: str, device_class: str) -> str | None:
    """The device class that output `output`'s bytes follow when built on
    `device_class`: that class if it is a LoRA extracted there, or a node it
    needs is `device_dependent`; else None."""
    if graph.recipe.outputs[output].lora is not None:
        return device_class
    node = graph.recipe.outputs[output].node
    nodes = nx.ancestors(graph.dag, node) | {node}
    recipe_nodes = graph.recipe.nodes
    dependent = any(device_dependent(recipe_nodes[n].expr) for n in nodes if n in recipe_nodes)
    return device_class if dependent else None
