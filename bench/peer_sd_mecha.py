"""Run sd-mecha (in its own virtualenv): peer_sd_mecha.py METHOD OUT A B [C] [ALPHA]."""

import sys

import sd_mecha
import torch

method, out, *rest = sys.argv[1:]
if method == "add_difference":
    a, b, c = (sd_mecha.model(path) for path in rest[:3])
    recipe = sd_mecha.add_difference(a, b, c, alpha=1.0)
else:
    a, b = (sd_mecha.model(path) for path in rest[:2])
    recipe = sd_mecha.weighted_sum(a, b, alpha=float(rest[2]))
sd_mecha.merge(recipe, output=out, output_dtype=torch.float16, threads=2)
