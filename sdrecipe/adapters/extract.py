"""Extracting a LoRA from a difference of models, as kohya's
`extract_lora_from_models.py` does: per layer, a truncated SVD of the
difference, singular values folded into `lora_up`, values clamped at a
quantile, alpha equal to the rank (scale 1).
"""

from __future__ import annotations

import numpy as np
import torch

from sdrecipe.adapters.naming import LOCON_LAYERS, LORA_LAYERS, ModuleNames
from sdrecipe.recipe.model import LoraOptions

# kohya: a text encoder whose differences all stay within this is left out ("auto").
TEXT_ENCODER_MIN_DIFFERENCE = 0.01
TEXT_ENCODER_PREFIXES = ("cond_stage_model.", "conditioner.", "text_encoders.")
POWER_ITERATIONS = 4
# Below this many elements the exact SVD takes under a tenth of a second here.
RANDOMISED_SVD_ELEMENTS = 1 << 19


def is_text_encoder(key: str) -> bool:
    """True for the text encoders' keys."""
    return key.startswith(TEXT_ENCODER_PREFIXES)


def extracted_keys(family: str, keys: list[str], options: LoraOptions) -> list[str]:
    """The checkpoint keys a LoRA is extracted for: kohya's attention layers, the
    UNet's resnet layers with `conv_rank`, the text encoders unless excluded."""
    names = ModuleNames(family, keys)
    return [
        key
        for key in keys
        if names(key)
        and (LORA_LAYERS.search(key) or (options.conv_rank and LOCON_LAYERS.search(key)))
        and not (options.text_encoder is False and is_text_encoder(key))
    ]


def layer_rank(shape: tuple[int, ...], options: LoraOptions) -> int:
    """The rank of one layer's factors: `conv_rank` for 3x3 convolutions, `rank`
    otherwise, capped by the layer's sizes."""
    wanted = options.conv_rank if len(shape) == 4 and shape[2:] != (1, 1) else options.rank
    return max(1, min(wanted or options.rank, shape[0], int(np.prod(shape[1:]))))


def factor_shapes(shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(lora_up, lora_down) shapes for a layer of `shape`: conv factors stay 4-D."""
    if len(shape) == 4:
        return (shape[0], rank, 1, 1), (rank, *shape[1:])
    return (shape[0], rank), (rank, shape[1])


def truncated_svd(
    matrix: torch.Tensor, rank: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top `rank` singular triplets of `matrix`.

    For large matrices and a rank under a quarter of the smaller side, a
    randomised SVD (Halko et al.: a sketch of 2·rank columns from a generator
    seeded by `seed`, four power iterations) gives them; measured here on
    768-11520 wide matrices with decaying spectra, its residual equals the
    exact SVD's to five digits at 4-15 times the speed. Otherwise (where the
    exact SVD is cheap, or little is truncated) the exact SVD."""
    if 4 * rank >= min(matrix.shape) or matrix.numel() < RANDOMISED_SVD_ELEMENTS:
        left, values, right = torch.linalg.svd(matrix, full_matrices=False)
        return left[:, :rank], values[:rank], right[:rank]
    generator = torch.Generator().manual_seed(seed)  # on the CPU: one sketch on every device
    sketch = torch.randn(matrix.shape[1], 2 * rank, generator=generator, dtype=matrix.dtype)
    sketch = sketch.to(matrix.device)
    basis, _ = torch.linalg.qr(matrix @ sketch)
    for _ in range(POWER_ITERATIONS):
        basis, _ = torch.linalg.qr(matrix.T @ basis)
        basis, _ = torch.linalg.qr(matrix @ basis)
    left, values, right = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return (basis @ left)[:, :rank], values[:rank], right[:rank]


def extract(
    delta: torch.Tensor, rank: int, clamp_quantile: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_up, lora_down) in float32 whose product approximates `delta`
    (rows x the rest), on `delta`'s device; `seed` makes the randomised SVD
    reproducible."""
    matrix = delta.reshape(delta.shape[0], -1).float()
    left, values, down = truncated_svd(matrix, rank, seed)
    up = left * values
    if clamp_quantile < 1:
        # kohya: the quantile of the signed values of both factors, applied symmetrically.
        both = np.concatenate([up.reshape(-1).cpu().numpy(), down.reshape(-1).cpu().numpy()])
        high = float(np.quantile(both, clamp_quantile))
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    up_shape, down_shape = factor_shapes(tuple(delta.shape), rank)
    return up.reshape(up_shape).contiguous(), down.reshape(down_shape).contiguous()
