"""The rounding a quantized output adds: each output against the float32 merge.

Usage: python bench/precision.py ALPHA A B OUTPUT...
Each OUTPUT (safetensors or GGUF, read dequantized by sdrecipe's readers) is
compared with `(1 - ALPHA) * A + ALPHA * B` computed in float32 from the inputs,
tensor by tensor over the keys it holds. Prints one JSON object per output:
`rms` = sqrt(sum of squared errors / sum of squared values) over every tensor,
`max` = the largest (max |error| / max |value|) of any tensor, and the same two
over the matrices alone (the tensors the formats quantize).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from sdrecipe.io.readers import open_model


def compare(alpha: float, a_path: Path, b_path: Path, output: Path) -> dict[str, object]:
    a, b, out = open_model(a_path), open_model(b_path), open_model(output)
    keys = a.infos()
    names = {key.removeprefix("model.diffusion_model."): key for key in keys}
    totals = {"all": [0.0, 0.0, 0.0], "matrices": [0.0, 0.0, 0.0]}
    for key in out.infos():
        source = names.get(key, key)
        if source not in keys or not out.info(key).is_floating:
            continue
        wanted = a.tensor(source).float().mul(1 - alpha).add_(b.tensor(source).float(), alpha=alpha)
        error = out.tensor(key).float().sub_(wanted)
        largest = float(wanted.abs().max()) or 1.0
        groups = ["all", "matrices"] if wanted.dim() >= 2 else ["all"]
        for group in groups:
            total = totals[group]
            total[0] += float(error.double().square().sum())
            total[1] += float(wanted.double().square().sum())
            total[2] = max(total[2], float(error.abs().max()) / largest)
    return {
        "output": output.name,
        **{
            f"{group}_{name}": value
            for group, (squares, norms, worst) in totals.items()
            for name, value in (
                ("rms", math.sqrt(squares / norms) if norms else 0.0),
                ("max", worst),
            )
        },
    }


def main(alpha: str, a: str, b: str, *outputs: str) -> None:
    torch.set_num_threads(2)
    for output in outputs:
        print(json.dumps(compare(float(alpha), Path(a), Path(b), Path(output))), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
