"""Run sd-mecha (in its own virtualenv): peer_sd_mecha.py [OPTIONS] METHOD OUT MODEL... [ALPHA].

METHOD is add_difference (A B C), weighted_sum (A B ALPHA), ties, dare_ties
(BASE M1 M2 ...), slerp (A B) or lora (BASE LORA STRENGTH: bake a LoRA in).
Options: --bf16 writes bfloat16 (else float16); --own-config registers a model
config made from the first model's header and gives it to every model, for a
layout sd-mecha has no config of (1.1.8 takes an SD3.5 Large file for SD3
Medium's `sd3-comfyui` and leaves 432 of its 1167 tensors out, and an explicit
`StructuralModelConfig` fails in `merge`)."""

import json
import struct
import sys

import sd_mecha
import torch
from sd_mecha.extensions import model_configs
from sd_mecha.extensions.builtin.merge_methods import linear, ties

SAFETENSORS_DTYPES = {"F8_E4M3": "float8_e4m3fn", "BF16": "bfloat16", "F16": "float16"}


def own_config(path: str) -> str:
    """Register a config listing `path`'s tensors; return its identifier."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    keys = {
        key: {"shape": entry["shape"], "dtype": SAFETENSORS_DTYPES.get(entry["dtype"], "float32")}
        for key, entry in header.items()
    }
    config = {"identifier": "bench-input", "components": {"model": keys}}
    model_configs.register(model_configs.from_yaml(json.dumps(config)))  # JSON is YAML
    return "bench-input"


args = sys.argv[1:]
output_dtype, config = torch.float16, None
while args[0].startswith("--"):
    option = args.pop(0)
    if option == "--bf16":
        output_dtype = torch.bfloat16
    elif option == "--own-config":
        config = "own"
    else:
        sys.exit(f"unknown option {option}")
method, out, *rest = args
if config:
    config = own_config(rest[0])


def load(path: str) -> sd_mecha.RecipeNode:
    return sd_mecha.model(path, config=config)


if method == "add_difference":
    a, b, c = (load(path) for path in rest[:3])
    recipe = sd_mecha.add_difference(a, b, c, alpha=1.0)
elif method == "weighted_sum":
    a, b = (load(path) for path in rest[:2])
    recipe = sd_mecha.weighted_sum(a, b, alpha=float(rest[2]))
elif method in ("ties", "dare_ties"):
    # sd-mecha 1.1.8's wrappers (add_difference_ties, add_ties_with_dare) fail before
    # merging ('NoneType' object has no attribute 'identifier'): the same graph by hand.
    base, *models = (load(path) for path in rest)
    deltas = [linear.subtract(model, base) for model in models]
    if method == "ties":
        merged = ties.ties_sum(*deltas, k=0.2, vote_sgn=True)
    else:
        # apply_stock=True is plain TIES in sd-mecha 1.1.8 (the flag is inverted); k=1: no trim.
        merged = ties.ties_sum_with_dropout(
            *deltas, probability=0.9, k=1.0, seed=0, apply_stock=True, vote_sgn=True
        )
    recipe = linear.add_difference(base, merged, alpha=1.0)
elif method == "lora":
    base = load(rest[0])
    delta = sd_mecha.convert(load(rest[1]), base)  # the LoRA as a difference
    recipe = linear.add_difference(base, delta, alpha=float(rest[2]))
else:
    a, b = (load(path) for path in rest[:2])
    recipe = sd_mecha.slerp(a, b, alpha=0.5)
sd_mecha.merge(recipe, output=out, output_dtype=output_dtype, threads=2)
