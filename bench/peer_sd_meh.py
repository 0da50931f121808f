"""Run sd-meh (in its own virtualenv): peer_sd_meh.py METHOD OUT A B [C] [ALPHA]."""

import sys

from sd_meh.merge import NUM_TOTAL_BLOCKS, merge_models, save_model

method, out, *rest = sys.argv[1:]
paths, alpha = (rest[:3], 1.0) if method == "add_difference" else (rest[:2], float(rest[2]))
models = dict(zip(("model_a", "model_b", "model_c"), paths, strict=False))
merged = merge_models(
    models,
    weights={"alpha": [alpha] * NUM_TOTAL_BLOCKS},
    bases={"alpha": alpha},
    merge_mode=method,
    precision=16,
    threads=2,
)
save_model(merged, out.removesuffix(".safetensors"), "safetensors")
