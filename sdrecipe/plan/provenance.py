"""Metadata that records how an output was made.

Two views of the same lineage go into the safetensors header: sdrecipe's own
`sdrecipe.*` fields, among them a self-contained recipe for the output, and
AUTOMATIC1111's `sd_merge_recipe` / `sd_merge_models` fields, so the WebUI
shows where a merge came from. Only canonical forms are recorded (no absolute
paths, no times, no recipe file name or formatting), so building the embedded
recipe reproduces the output's bytes exactly.

sdrecipe's own fields are plain text (the recipe is YAML), never a JSON object:
A1111 parses every metadata value that starts with `{` and its merger then
fails to save the values it copies from its inputs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import yaml

from sdrecipe import __version__
from sdrecipe.arch import UNET_INPUT_CONV
from sdrecipe.arch.detect import Architecture
from sdrecipe.errors import RecipeError
from sdrecipe.io.bounded_json import load_json
from sdrecipe.io.fingerprint import Fingerprint
from sdrecipe.io.tensor_info import TensorInfo
from sdrecipe.methods import get_method
from sdrecipe.plan.graph import MergeGraph
from sdrecipe.recipe import Node, Output
from sdrecipe.recipe.expr import Call, format_expression
from sdrecipe.recipe.matrix import Renamer
from sdrecipe.recipe.schema import (
    EXPRESSION_FIELD,
    LEGACY_PROVENANCE_FIELD,
    NODE_FIELD,
    QUANTIZATION_FIELD,
    RECIPE_FIELD,
    VERSION_FIELD,
)
from sdrecipe.recipe.yaml_source import load_yaml

# Inherited lineage (`sd_merge_models`) is capped at this many bytes of JSON, so
# a header stays far below the 100 MB that safetensors readers accept, however
# many generations of merges it records.
MAX_LINEAGE_BYTES = 1_000_000
# The `sd_merge_models` entry that says the lineage was capped.
LINEAGE_TRUNCATED = "sdrecipe:lineage-truncated"
_RANKS = ("primary", "secondary", "tertiary")
# sdrecipe's methods that are A1111's, with its names; their `alpha` is its multiplier.
_A1111_METHOD_NAMES = {"weighted_sum": "Weighted sum", "add_difference": "Add difference"}
# The `type` of the `sd_merge_recipe` sdrecipe writes.
MERGE_RECIPE_TYPE = "sdrecipe"


@dataclass(frozen=True)
class Provenance:
    """sdrecipe's record of how a file was made: its version, the output's node
    and expression, the embedded recipe and the inputs it names (file, sha256)."""

    version: str
    node: str
    expression: str
    recipe: str
    inputs: dict[str, dict[str, str]]


def output_metadata(
    graph: MergeGraph,
    output: str,
    tensors: Mapping[str, TensorInfo],
    hashes: Mapping[str, Fingerprint],
    input_metadata: Mapping[str, Mapping[str, str]],
    architecture: Architecture,
    quantization: Mapping[str, str | None] | None = None,
) -> dict[str, str]:
    """The `__metadata__` entries for `output`: the output's own `metadata`, the
    SAI model spec fields, sdrecipe's entry and A1111's lineage fields; with
    `quantization` (each input's, in words), what is stored quantized."""
    recipe = graph.recipe
    node = recipe.nodes[recipe.outputs[output].node]
    leaves = graph.inputs_of(node.name)
    merge_recipe = _a1111_recipe(graph, output, tensors, [hashes[name].sha256 for name in leaves])
    spec = recipe.outputs[output]
    modelspec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture.modelspec,
        "modelspec.title": spec.path.stem,
        "modelspec.prediction_type": architecture.prediction,
    }
    stored = {
        name: quantization[name] for name in leaves if quantization and quantization.get(name)
    }
    written = output_quantization(spec)
    quantized = {"inputs": stored, **({"output": written} if written else {})}
    return {
        **{key: value for key, value in modelspec.items() if value is not None},
        **spec.metadata,
        **({QUANTIZATION_FIELD: json.dumps(quantized)} if stored or written else {}),
        "format": "pt",
        VERSION_FIELD: __version__,
        NODE_FIELD: node.written_name,
        EXPRESSION_FIELD: written_expression(graph, node),
        RECIPE_FIELD: output_recipe(graph, output, hashes),
        "sd_merge_recipe": json.dumps(merge_recipe, ensure_ascii=False),
        "sd_merge_models": json.dumps(
            _a1111_models(graph, leaves, hashes, input_metadata), ensure_ascii=False
        ),
    }


def read_provenance(metadata: Mapping[str, str]) -> Provenance | None:
    """sdrecipe's record of how the file with `metadata` was made, in either form;
    None when there is none, it is unreadable, or it describes an input: another
    merger (its `sd_merge_recipe` says so) copied it from the files it merged."""
    merge_recipe = json_field(metadata, "sd_merge_recipe")
    if merge_recipe is not None and merge_recipe.get("type") != MERGE_RECIPE_TYPE:
        return None
    if RECIPE_FIELD in metadata:
        fields = {
            "version": metadata.get(VERSION_FIELD),
            "node": metadata.get(NODE_FIELD),
            "expression": metadata.get(EXPRESSION_FIELD),
            "recipe": metadata[RECIPE_FIELD],
        }
        try:
            document = load_yaml(fields["recipe"], Path("embedded recipe"), lambda path: True)
            named = document.data["inputs"]
            inputs = {
                str(name): {"file": str(entry["path"]), "sha256": str(entry["sha256"])}
                for name, entry in named.items()
            }
        except (RecipeError, KeyError, TypeError, AttributeError):
            inputs = {}
    else:
        fields = json_field(metadata, LEGACY_PROVENANCE_FIELD) or {}
        inputs = fields.get("inputs")
    if not all(isinstance(fields.get(f), str) for f in ("version", "node", "expression")):
        return None
    return Provenance(
        version=fields["version"],
        node=fields["node"],
        expression=fields["expression"],
        recipe=str(fields.get("recipe", "")),
        inputs=inputs if isinstance(inputs, dict) else {},
    )


def output_recipe(graph: MergeGraph, output: str, hashes: Mapping[str, Fingerprint]) -> str:
    """A self-contained recipe for just this output: the inputs (by file name, pinned
    by sha256), nodes and output it depends on. Edits elsewhere in the recipe file
    leave it, and so the output's bytes, unchanged."""
    recipe = graph.recipe
    spec = recipe.outputs[output]
    needed = nx.ancestors(graph.dag, spec.node) | {spec.node}
    names = {name: name for name in graph.inputs_of(spec.node)}
    if spec.vae is not None and spec.vae not in names:
        # A VAE given by path is an input named after its output; name it plainly.
        names[spec.vae] = next(
            f"vae{n or ''}" for n in range(len(names) + 1) if f"vae{n or ''}" not in names
        )
    document = {
        "inputs": {
            new: {"path": recipe.inputs[name].written_path, "sha256": hashes[name].sha256}
            for name, new in names.items()
        },
        "nodes": {
            recipe.nodes[name].written_name: _node_entry(graph, recipe.nodes[name])
            for name in graph.order
            if name in needed
        },
        "outputs": {spec.origin or output: _output_entry(spec, names.get(spec.vae or ""))},
    }
    return yaml.safe_dump(document, sort_keys=False, width=1000)


def written_expression(graph: MergeGraph, node: Node) -> str:
    """`node`'s expression as the recipe writes it: a matrix variant refers to the
    nodes it uses by their written names, so its provenance (and bytes) equal
    those of a recipe written for that variant alone."""
    written = {name: other.written_name for name, other in graph.recipe.nodes.items()}
    return format_expression(Renamer(written).visit(node.expr))


def _node_entry(graph: MergeGraph, node: Node) -> str | dict[str, object]:
    """A node as a recipe writes it: its expression, with options that change bytes."""
    expression = written_expression(graph, node)
    selection = node.selection
    options: dict[str, object] = {
        "only": sorted(selection.only),
        "exclude": sorted(selection.exclude),
        "include_keys": [p.pattern for p in selection.include_keys],
        "exclude_keys": [p.pattern for p in selection.exclude_keys],
        "force": node.force,
    }
    options = {key: value for key, value in options.items() if value}
    return {"expression": expression, **options} if options else expression


def output_quantization(spec: Output) -> str | None:
    """How an output stores its tensors quantized, in words (None: it does not)."""
    if spec.format == "gguf":
        return f"GGUF {spec.quant}"
    if spec.dtype and spec.dtype.startswith("fp8"):
        return f"{spec.dtype}{' scaled (ComfyUI)' if spec.scaled else ''}"
    return None


def _output_entry(spec: Output, vae: str | None) -> dict[str, object]:
    entry: dict[str, object] = {"path": spec.path.name}
    if spec.format != "safetensors":
        entry["format"] = spec.format
    if spec.dtype:
        entry["dtype"] = spec.dtype
    if spec.scaled:
        entry["scaled"] = True
    if spec.quant:
        entry["quant"] = spec.quant
    if spec.prune_ema:
        entry["prune_ema"] = True
    if spec.space != "model":
        entry["space"] = spec.space
    if vae:
        entry["vae"] = vae
    if spec.metadata:
        entry["metadata"] = dict(spec.metadata)
    return entry


def _a1111_recipe(
    graph: MergeGraph, output: str, tensors: Mapping[str, TensorInfo], shas: list[str]
) -> dict[str, object]:
    recipe = graph.recipe
    spec = recipe.outputs[output]
    expr = recipe.nodes[spec.node].expr
    a1111_method = _A1111_METHOD_NAMES.get(expr.method) if isinstance(expr, Call) else None
    multiplier = dict(expr.params).get("alpha", _default_alpha(expr)) if a1111_method else None
    if not isinstance(multiplier, (int, float)):
        # A per-block or per-key alpha is no A1111 multiplier: the expression says it all.
        a1111_method, multiplier = None, None
    conv_in = tensors.get(UNET_INPUT_CONV)
    channels = conv_in.shape[1] if conv_in is not None and len(conv_in.shape) == 4 else None
    return {
        "type": MERGE_RECIPE_TYPE,
        "primary_model_hash": shas[0] if shas else None,
        "secondary_model_hash": shas[1] if len(shas) > 1 else None,
        "tertiary_model_hash": shas[2] if len(shas) > 2 else None,
        "interp_method": a1111_method or written_expression(graph, recipe.nodes[spec.node]),
        "multiplier": multiplier,
        "save_as_half": spec.dtype == "float16",
        "custom_name": spec.path.stem,
        "config_source": 0,
        "bake_in_vae": recipe.inputs[spec.vae].file_name if spec.vae else "None",
        "discard_weights": "",
        "is_inpainting": channels == 9,
        "is_instruct_pix2pix": channels == 8,
    }


def _default_alpha(call: Call) -> float:
    """The `alpha` a classic method uses when the recipe does not set it."""
    return get_method(call.method).parameters.model_fields["alpha"].default


def _a1111_models(
    graph: MergeGraph,
    leaves: list[str],
    hashes: Mapping[str, Fingerprint],
    input_metadata: Mapping[str, Mapping[str, str]],
) -> dict[str, object]:
    """Each input as A1111 records it, plus the lineage each input already carries
    (capped, see `cap_lineage`)."""
    inherited: dict[str, object] = {}
    for name in leaves:
        inherited.update(json_field(input_metadata[name], "sd_merge_models") or {})
    own: dict[str, object] = {}
    for name in leaves:
        recipe = json_field(input_metadata[name], "sd_merge_recipe")
        if recipe is not None and len(json.dumps(recipe)) > MAX_LINEAGE_BYTES // 4:
            recipe = {"dropped": "this merge recipe was too large to keep"}
        own[hashes[name].sha256] = {
            "name": graph.recipe.inputs[name].file_name,
            "legacy_hash": hashes[name].legacy,
            "sd_merge_recipe": recipe,
        }
    return {**cap_lineage(inherited, own), **own}


def cap_lineage(inherited: dict[str, object], own: dict[str, object]) -> dict[str, object]:
    """`inherited` if it fits in MAX_LINEAGE_BYTES; otherwise its nearest generations
    that fit, in their order, and a LINEAGE_TRUNCATED entry saying what was dropped.

    Generations follow the model hashes each entry's merge recipe names, starting
    from the `own` entries (the inputs); entries no path reaches count as the
    most distant."""
    sizes = {
        sha: len(json.dumps({sha: entry}, ensure_ascii=False)) for sha, entry in inherited.items()
    }
    if sum(sizes.values()) <= MAX_LINEAGE_BYTES:
        return inherited
    generation: dict[str, int] = {}
    entries = {**inherited, **own}
    frontier, level = list(own), 0
    while frontier:
        following = []
        for sha in frontier:
            if sha in generation:
                continue
            generation[sha] = level
            entry = entries.get(sha)
            recipe = entry.get("sd_merge_recipe") if isinstance(entry, dict) else None
            if isinstance(recipe, dict):
                following += [recipe.get(f"{rank}_model_hash") for rank in _RANKS]
        frontier, level = [sha for sha in following if isinstance(sha, str)], level + 1
    nearest_first = sorted(inherited, key=lambda sha: generation.get(sha, level))
    kept: set[str] = set()
    used = 0
    for sha in nearest_first:
        if used + sizes[sha] > MAX_LINEAGE_BYTES:
            break
        kept.add(sha)
        used += sizes[sha]
    capped = {sha: entry for sha, entry in inherited.items() if sha in kept}
    capped[LINEAGE_TRUNCATED] = {
        "name": f"{len(inherited) - len(kept)} more distant ancestors were dropped to keep "
        f"the lineage under {MAX_LINEAGE_BYTES:,} bytes",
        "legacy_hash": None,
        "sd_merge_recipe": None,
    }
    return capped


def json_field(metadata: Mapping[str, str], field: str) -> dict | None:
    try:
        value = load_json(metadata[field])
    except (KeyError, ValueError):
        return None
    return value if isinstance(value, dict) else None
