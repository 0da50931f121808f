"""The classic checkpoint-merger methods (AUTOMATIC1111, InvokeAI, diffusers).

Each formula matches the established tools; see README "Semantics".
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from sdrecipe.methods.registry import DIFFERENCE, SAME_BYTES, merge_method

if TYPE_CHECKING:
    import torch

Ratio = Annotated[float, Field(ge=0.0, le=1.0)]


@merge_method(device=SAME_BYTES)
def weighted_sum(a: torch.Tensor, b: torch.Tensor, *, alpha: float = 0.5) -> torch.Tensor:
    """(1 - alpha)·A + alpha·B; alpha is the weight of the second model."""
    result = a.mul(1.0 - alpha)
    return result.add_(b.mul(alpha))


@merge_method(spaces={"a": "S", "b": "T", "c": "T", "return": "S"}, device=SAME_BYTES)
def add_difference(
    a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *, alpha: float = 1.0
) -> torch.Tensor:
    """A + alpha·(B - C): transplant what B learned on top of C into A."""
    difference = b.sub(c).mul_(alpha)
    return difference.add_(a)


@merge_method(
    spaces={"difference": DIFFERENCE, "return": DIFFERENCE}, scales_by="alpha", device=SAME_BYTES
)
def scale(difference: torch.Tensor, *, alpha: float = 1.0) -> torch.Tensor:
    """alpha·D: a difference at a strength that may vary by block, as LoRA block
    weights do (`A + scale(L, alpha="INALL")`)."""
    return difference.mul(alpha)


def _interpolate(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    return b.sub(a).mul_(weight).add_(a)


def sigmoid_weight(alpha: float) -> float:
    """Smoothstep remapping of alpha: alpha²(3 - 2·alpha)."""
    return alpha * alpha * (3.0 - 2.0 * alpha)


def inverse_sigmoid_weight(alpha: float) -> float:
    """Inverse smoothstep remapping of alpha: 0.5 - sin(asin(1 - 2·alpha) / 3)."""
    return 0.5 - math.sin(math.asin(1.0 - 2.0 * alpha) / 3.0)


@merge_method(device=SAME_BYTES)
def sigmoid(a: torch.Tensor, b: torch.Tensor, *, alpha: Ratio = 0.5) -> torch.Tensor:
    """A + alpha'·(B - A) with the smoothstep alpha' = alpha²(3 - 2·alpha)."""
    return _interpolate(a, b, sigmoid_weight(alpha))


@merge_method(device=SAME_BYTES)
def inv_sigmoid(a: torch.Tensor, b: torch.Tensor, *, alpha: Ratio = 0.5) -> torch.Tensor:
    """A + alpha'·(B - A) with alpha' = 0.5 - sin(asin(1 - 2·alpha) / 3)."""
    return _interpolate(a, b, inverse_sigmoid_weight(alpha))
