"""DoRA over any algorithm's weight delta (each algorithm's own delta is its
class's, `sdrecipe.adapters.algorithms`), as A1111 and ComfyUI apply it."""

from __future__ import annotations

import torch

# Added to DoRA's norm, as LyCORIS does, so that an all-zero row stays finite.
DORA_EPSILON = torch.finfo(torch.float32).eps


def dora_axis(magnitude: tuple[int, ...]) -> int:
    """The axis DoRA's norm keeps, from the magnitude's shape: 1 (per input column)
    for [1, in, ...], else 0 (per output row)."""
    return 1 if len(magnitude) > 1 and magnitude[0] == 1 and magnitude[1] > 1 else 0


def dora_delta(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA as A1111 and ComfyUI apply it: with W' = W + dW, the delta
    m·W'/|W'| - W, so that strength s gives W + s·(m·W'/|W'| - W).

    The norm runs along the axis `magnitude` keeps: [out, 1, ...] is per output
    row (LyCORIS since 2025, PEFT), [1, in, ...] per input column (older files)."""
    combined = weight + delta
    axis = dora_axis(tuple(magnitude.shape))
    others = [d for d in range(combined.dim()) if d != axis]
    norm = torch.linalg.vector_norm(combined, dim=others, keepdim=True).add_(DORA_EPSILON)
    return combined.mul_(magnitude.reshape(norm.shape) / norm).sub_(weight)
