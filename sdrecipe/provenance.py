"""Metadata that records how an output was made.

Two views of the same lineage go into the safetensors header: sdrecipe's own
entry (the full recipe) and AUTOMATIC1111's `sd_merge_recipe` / `sd_merge_models`
fields, so the WebUI shows where a merge came from. Nothing machine-specific
(absolute paths, times) is recorded, so identical builds give identical bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from sdrecipe import __version__
from sdrecipe.arch import UNET_INPUT_CONV
from sdrecipe.graph import MergeGraph
from sdrecipe.hashing import FileHashes
from sdrecipe.io.tensor_info import TensorInfo
from sdrecipe.recipe.expr import Call

_A1111_METHOD_NAMES = {"weighted_sum": "Weighted sum", "add_difference": "Add difference"}


def output_metadata(
    graph: MergeGraph,
    output: str,
    tensors: Mapping[str, TensorInfo],
    hashes: Mapping[str, FileHashes],
    input_metadata: Mapping[str, Mapping[str, str]],
) -> dict[str, str]:
    """The `__metadata__` entries for `output`, given its inputs' hashes and metadata."""
    recipe = graph.recipe
    node = recipe.nodes[recipe.outputs[output].node]
    leaves = graph.inputs_of(node.name)
    own = {
        "version": __version__,
        "recipe_file": recipe.path.name,
        "recipe": recipe.text,
        "node": node.name,
        "expression": node.source,
        "inputs": {
            name: {"file": recipe.inputs[name].path.name, "sha256": hashes[name].sha256}
            for name in leaves
        },
    }
    merge_recipe = _a1111_recipe(graph, output, tensors, [hashes[name].sha256 for name in leaves])
    return {
        "format": "pt",
        "sdrecipe": json.dumps(own, ensure_ascii=False),
        "sd_merge_recipe": json.dumps(merge_recipe, ensure_ascii=False),
        "sd_merge_models": json.dumps(
            _a1111_models(graph, leaves, hashes, input_metadata), ensure_ascii=False
        ),
    }


def _a1111_recipe(
    graph: MergeGraph, output: str, tensors: Mapping[str, TensorInfo], shas: list[str]
) -> dict[str, object]:
    recipe = graph.recipe
    spec = recipe.outputs[output]
    node = recipe.nodes[spec.node]
    expr = node.expr
    is_call = isinstance(expr, Call)
    conv_in = tensors.get(UNET_INPUT_CONV)
    channels = conv_in.shape[1] if conv_in is not None and len(conv_in.shape) == 4 else None
    return {
        "type": "sdrecipe",
        "primary_model_hash": shas[0] if shas else None,
        "secondary_model_hash": shas[1] if len(shas) > 1 else None,
        "tertiary_model_hash": shas[2] if len(shas) > 2 else None,
        "interp_method": _A1111_METHOD_NAMES.get(expr.method, node.source)
        if is_call
        else node.source,
        "multiplier": dict(expr.params).get("alpha") if is_call else None,
        "save_as_half": spec.dtype == "float16",
        "custom_name": spec.path.stem,
        "config_source": None,
        "bake_in_vae": None,
        "discard_weights": "",
        "is_inpainting": channels == 9,
        "is_instruct_pix2pix": channels == 8,
    }


def _a1111_models(
    graph: MergeGraph,
    leaves: list[str],
    hashes: Mapping[str, FileHashes],
    input_metadata: Mapping[str, Mapping[str, str]],
) -> dict[str, object]:
    """Each input as A1111 records it, plus the lineage each input already carries."""
    models: dict[str, object] = {}
    for name in leaves:
        models.update(_json_field(input_metadata[name], "sd_merge_models") or {})
    for name in leaves:
        models[hashes[name].sha256] = {
            "name": graph.recipe.inputs[name].path.stem,
            "legacy_hash": hashes[name].legacy,
            "sd_merge_recipe": _json_field(input_metadata[name], "sd_merge_recipe"),
        }
    return models


def _json_field(metadata: Mapping[str, str], field: str) -> dict | None:
    try:
        value = json.loads(metadata[field])
    except (KeyError, ValueError):
        return None
    return value if isinstance(value, dict) else None
