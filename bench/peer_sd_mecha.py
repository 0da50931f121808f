"""Run sd-mecha (in its own virtualenv): peer_sd_mecha.py METHOD OUT MODEL... [ALPHA].

METHOD is add_difference (A B C), weighted_sum (A B ALPHA), ties, dare_ties
(BASE M1 M2 ...), slerp (A B) or lora (BASE LORA STRENGTH: bake a LoRA in)."""

import sys

import sd_mecha
import torch
from sd_mecha.extensions.builtin.merge_methods import linear, ties

method, out, *rest = sys.argv[1:]
if method == "add_difference":
    a, b, c = (sd_mecha.model(path) for path in rest[:3])
    recipe = sd_mecha.add_difference(a, b, c, alpha=1.0)
elif method == "weighted_sum":
    a, b = (sd_mecha.model(path) for path in rest[:2])
    recipe = sd_mecha.weighted_sum(a, b, alpha=float(rest[2]))
elif method in ("ties", "dare_ties"):
    # sd-mecha 1.1.8's wrappers (add_difference_ties, add_ties_with_dare) fail before
    # merging ('NoneType' object has no attribute 'identifier'): the same graph by hand.
    base, *models = (sd_mecha.model(path) for path in rest)
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
    base = sd_mecha.model(rest[0])
    delta = sd_mecha.convert(sd_mecha.model(rest[1]), base)  # the LoRA as a difference
    recipe = linear.add_difference(base, delta, alpha=float(rest[2]))
else:
    a, b = (sd_mecha.model(path) for path in rest[:2])
    recipe = sd_mecha.slerp(a, b, alpha=0.5)
sd_mecha.merge(recipe, output=out, output_dtype=torch.float16, threads=2)
