"""The element-wise three-model family of supermerger and sd-meh.

Each works on any slice of rows, so it streams like `add_difference`. The
formulas are the established tools'; README "Merge methods" says which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdrecipe.methods.registry import OWN_BYTES, SAME_BYTES, merge_method

if TYPE_CHECKING:
    from torch import Tensor

# supermerger's trainDifference scales the transplanted difference by 1.8.
TRAIN_DIFFERENCE_GAIN = 1.8


@merge_method(device=SAME_BYTES)
def triple_sum(a: Tensor, b: Tensor, c: Tensor, *, alpha: float = 0.3, beta: float = 0.3) -> Tensor:
    """(1 - alpha - beta)·A + alpha·B + beta·C."""
    result = a.mul(1.0 - alpha - beta)
    return result.add_(b, alpha=alpha).add_(c, alpha=beta)


@merge_method(device=SAME_BYTES)
def sum_twice(a: Tensor, b: Tensor, c: Tensor, *, alpha: float = 0.5, beta: float = 0.3) -> Tensor:
    """(1 - beta)·((1 - alpha)·A + alpha·B) + beta·C: a weighted sum, then another."""
    result = a.mul(1.0 - alpha).add_(b, alpha=alpha)
    return result.mul_(1.0 - beta).add_(c, alpha=beta)


@merge_method(device=SAME_BYTES)
def train_difference(a: Tensor, b: Tensor, c: Tensor, *, alpha: float = 1.0) -> Tensor:
    """A + 1.8·alpha·(B - C)·|B - A| / (|B - A| + |B - C|), 0 where both are 0:
    the difference B - C, applied where it moves A the way B went."""
    toward_b = b.sub(a).abs_()
    difference = b.sub(c)
    share = toward_b.div(toward_b + difference.abs()).nan_to_num_(nan=0.0)
    return difference.mul_(share).mul_(TRAIN_DIFFERENCE_GAIN * alpha).add_(a)


@merge_method(device=OWN_BYTES)  # pow rounds differently on each device
def multiply_difference(
    a: Tensor, b: Tensor, c: Tensor, *, alpha: float = 0.5, beta: float = 0.5
) -> Tensor:
    """C + |A - C|^(1 - alpha)·|B - C|^alpha, with the sign of
    (1 - beta)·A + beta·B - C: a geometric blend of the two differences."""
    magnitude = a.sub(c).abs_().pow_(1.0 - alpha).mul_(b.sub(c).abs_().pow_(alpha))
    direction = a.mul(1.0 - beta).add_(b, alpha=beta).sub_(c)
    return magnitude.copysign_(direction).add_(c)


@merge_method(device=SAME_BYTES)
def similarity_add_difference(
    a: Tensor, b: Tensor, c: Tensor, *, alpha: float = 1.0, beta: float = 1.0
) -> Tensor:
    """Where A and B agree, lean to their average; where they differ, to A + alpha·(B - C).

    s = beta·(A·B / max(|A|, |B|)² + 1) / 2 (beta where both are 0), then
    (1 - s)·(A + alpha·(B - C)) + s·((1 - alpha/2)·A + (alpha/2)·B)."""
    largest = a.abs().maximum(b.abs()).square_()
    similarity = a.mul(b).div_(largest).add_(1.0).mul_(beta / 2.0).nan_to_num_(nan=beta)
    added = b.sub(c).mul_(alpha).add_(a)
    averaged = a.mul(1.0 - alpha / 2.0).add_(b, alpha=alpha / 2.0)
    return averaged.sub_(added).mul_(similarity).add_(added)
