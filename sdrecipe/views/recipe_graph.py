"""`sdrecipe graph`: a recipe's DAG (inputs, nodes, outputs) with each node's
status from the one status rule, as Mermaid, Graphviz dot, JSON, SVG or PNG."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import networkx as nx

from sdrecipe.plan.graph import MergeGraph, build_graph
from sdrecipe.plan.recipe_set import RecipeSet, Upstream
from sdrecipe.plan.status import NodeStatus, Status
from sdrecipe.recipe import Recipe
from sdrecipe.recipe.expr import format_expression
from sdrecipe.views.mermaid import mermaid_label
from sdrecipe.views.scene import Box, Line, Scene, Text, text_width

INPUT, NODE, OUTPUT = "input", "node", "output"
UNKNOWN = "unknown"
# Fill colours by status; inputs and outputs without a status are grey.
COLOURS = {
    Status.UP_TO_DATE: "#c8e6c9",
    Status.FROM_CACHE: "#bbdefb",
    Status.REBUILD: "#ffcc80",
    UNKNOWN: "#eeeeee",
    INPUT: "#f5f5f5",
}
MAX_DETAIL = 48


@dataclass(frozen=True)
class Vertex:
    """One box of the picture: an input file, a node, or an output file."""

    id: str
    kind: str
    name: str
    detail: str
    status: str
    reason: str = ""


@dataclass(frozen=True)
class RecipeGraph:
    """The vertices in evaluation order and the edges between them."""

    vertices: tuple[Vertex, ...]
    edges: tuple[tuple[str, str], ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "vertices": [asdict(vertex) for vertex in self.vertices],
            "edges": [list(edge) for edge in self.edges],
        }


def recipe_graph(graph: MergeGraph, statuses: Sequence[NodeStatus] | None) -> RecipeGraph:
    """The DAG of the selected outputs; `statuses` None when they are unknown."""
    recipe = graph.recipe
    known = {status.node: status for status in statuses or ()}
    needed_inputs: dict[str, None] = {}
    for output in graph.outputs:
        needed_inputs.update(dict.fromkeys(graph.output_inputs(output)))
    vertices = [
        Vertex(f"input:{name}", INPUT, name, recipe.inputs[name].file_name, INPUT)
        for name in needed_inputs
    ]
    edges: list[tuple[str, str]] = []
    for name in graph.order:
        node = recipe.nodes[name]
        status = known.get(name)
        vertices.append(
            Vertex(
                f"node:{name}",
                NODE,
                name,
                _shorten(format_expression(node.expr)),
                status.status if status else UNKNOWN,
                status.reason if status else "",
            )
        )
        for operand in graph.operands(name):
            kind = INPUT if operand in recipe.inputs else NODE
            edges.append((f"{kind}:{operand}", f"node:{name}"))
    for output in graph.outputs:
        spec = recipe.outputs[output]
        status = known.get(spec.node)
        vertices.append(
            Vertex(
                f"output:{output}",
                OUTPUT,
                output,
                spec.path.name,
                status.status if status else UNKNOWN,
                status.reason if status else "",
            )
        )
        edges.append((f"node:{spec.node}", f"output:{output}"))
        if spec.vae is not None:
            edges.append((f"input:{spec.vae}", f"output:{output}"))
    return RecipeGraph(tuple(vertices), tuple(dict.fromkeys(edges)))


def graph_of(
    recipe_set: RecipeSet, names: Sequence[str], statuses: Mapping[Path, Sequence[NodeStatus]]
) -> RecipeGraph:
    """The DAG of the set's recipes (of the named outputs only, if any) with the
    statuses known for each; several recipes are one graph (see `combine`)."""
    loaded = list(recipe_set.recipes)
    parts = [
        recipe_graph(build_graph(recipe, names or None), statuses.get(recipe.path))
        for recipe in loaded
    ]
    if len(parts) == 1:
        return parts[0]
    links = [(up, recipe) for recipe in loaded for up in recipe_set.needs(recipe)]
    return combine(loaded, parts, links)


def combine(
    recipes: Sequence[Recipe],
    parts: Sequence[RecipeGraph],
    links: Sequence[tuple[Upstream, Recipe]],
) -> RecipeGraph:
    """One graph of several recipes' graphs: each vertex named after its recipe,
    and an edge from each output to the inputs of other recipes that read it."""
    vertices: list[Vertex] = []
    edges: list[tuple[str, str]] = []
    for recipe, part in zip(recipes, parts, strict=True):
        prefix = f"{recipe.path.stem}/"
        vertices += [
            dataclasses.replace(v, id=prefix + v.id, name=prefix + v.name) for v in part.vertices
        ]
        edges += [(prefix + source, prefix + target) for source, target in part.edges]
    known = {vertex.id for vertex in vertices}
    for upstream, recipe in links:
        source = f"{upstream.recipe.path.stem}/output:{upstream.output}"
        target = f"{recipe.path.stem}/input:{upstream.input}"
        if source in known and target in known:
            edges.append((source, target))
    return RecipeGraph(tuple(vertices), tuple(edges))


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 1] + "…"


def _label(vertex: Vertex) -> list[str]:
    lines = [vertex.name, vertex.detail]
    if vertex.kind != INPUT:
        lines.append(vertex.status + (f": {vertex.reason}" if vertex.reason else ""))
    return [_shorten(line) for line in lines]


def to_mermaid(view: RecipeGraph) -> str:
    """A Mermaid flowchart (pastes into a README or a GitHub comment)."""
    ids = {vertex.id: f"v{index}" for index, vertex in enumerate(view.vertices)}
    lines = ["flowchart LR"]
    for vertex in view.vertices:
        label = mermaid_label(_label(vertex))
        shape = {INPUT: '[("{}")]', NODE: '["{}"]', OUTPUT: '[/"{}"/]'}[vertex.kind]
        lines.append(f"  {ids[vertex.id]}{shape.format(label)}")
    lines += [f"  {ids[source]} --> {ids[target]}" for source, target in view.edges]
    for status, colour in COLOURS.items():
        lines.append(f"  classDef {_class(status)} fill:{colour},stroke:#333333")
    for vertex in view.vertices:
        lines.append(f"  class {ids[vertex.id]} {_class(vertex.status)}")
    return "\n".join(lines) + "\n"


def _class(status: str) -> str:
    return re.sub(r"\W", "_", status)


def to_dot(view: RecipeGraph) -> str:
    """A Graphviz digraph, left to right, boxes filled by status."""
    shapes = {INPUT: "cylinder", NODE: "box", OUTPUT: "note"}
    lines = ["digraph recipe {", "  rankdir=LR;", '  node [style="filled,rounded" fontsize=11];']
    for vertex in view.vertices:
        label = "\\n".join(_dot_text(line) for line in _label(vertex))
        lines.append(
            f'  "{_dot_text(vertex.id)}" [label="{label}" shape={shapes[vertex.kind]} '
            f'fillcolor="{COLOURS.get(vertex.status, COLOURS[UNKNOWN])}"];'
        )
    for source, target in view.edges:
        lines.append(f'  "{_dot_text(source)}" -> "{_dot_text(target)}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


FONT = 12
LINE_HEIGHT = 17
PAD = 10
COLUMN_GAP = 60
ROW_GAP = 18
MARGIN = 20


def to_scene(view: RecipeGraph) -> Scene:
    """The DAG drawn left to right: one column per depth, boxes filled by status,
    and a legend of the colours."""
    dag = nx.DiGraph(view.edges)
    dag.add_nodes_from(vertex.id for vertex in view.vertices)
    depth: dict[str, int] = {}
    for vertex_id in nx.topological_sort(dag):
        depth[vertex_id] = max((depth[p] + 1 for p in dag.predecessors(vertex_id)), default=0)
    columns: dict[int, list[Vertex]] = {}
    for vertex in view.vertices:
        columns.setdefault(depth[vertex.id], []).append(vertex)
    sizes = {
        vertex.id: (
            max(text_width(line, FONT) for line in _label(vertex)) + 2 * PAD,
            len(_label(vertex)) * LINE_HEIGHT + PAD,
        )
        for vertex in view.vertices
    }
    positions: dict[str, tuple[float, float]] = {}
    x = MARGIN
    height = 0.0
    for column in sorted(columns):
        width = max(sizes[vertex.id][0] for vertex in columns[column])
        y = MARGIN
        for vertex in columns[column]:
            positions[vertex.id] = (x, y)
            y += sizes[vertex.id][1] + ROW_GAP
        height = max(height, y)
        x += width + COLUMN_GAP
    legend_y = height + 4
    scene = Scene(int(max(x - COLUMN_GAP + MARGIN, 420)), int(legend_y + 30))
    for source, target in view.edges:
        (sx, sy), (tx, ty) = positions[source], positions[target]
        start = (sx + sizes[source][0], sy + sizes[source][1] / 2)
        end = (tx, ty + sizes[target][1] / 2)
        middle = (start[0] + end[0]) / 2
        scene.add(Line((start, (middle, start[1]), (middle, end[1]), end), arrow=True))
    for vertex in view.vertices:
        (vx, vy), (width, box_height) = positions[vertex.id], sizes[vertex.id]
        fill = COLOURS.get(vertex.status, COLOURS[UNKNOWN])
        radius = 6 if vertex.kind == NODE else 0
        scene.add(Box(vx, vy, width, box_height, fill, radius=radius, key=vertex.id))
        for index, line in enumerate(_label(vertex)):
            y = vy + PAD / 2 + LINE_HEIGHT * (index + 0.5)
            scene.add(Text(vx + PAD, y, line, FONT, bold=index == 0))
    x = MARGIN
    for status in (Status.UP_TO_DATE, Status.FROM_CACHE, Status.REBUILD, UNKNOWN):
        scene.add(Box(x, legend_y + 6, 14, 14, COLOURS[status]))
        scene.add(Text(x + 20, legend_y + 13, str(status), 11))
        x += 20 + text_width(str(status), 11) + 18
    return scene
