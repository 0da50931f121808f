"""Whole-tensor methods on the sphere, as mergekit 0.1.5 defines them: NuSLERP,
multi-SLERP and the Karcher mean, of models or (the `_delta` forms) of their
task vectors over a base, added back to it.

Each result is a linear combination of the operands (and the base) whose
coefficients depend only on their inner products. One pass accumulates those
in float64, from float64 products of the operands as converted to the compute
dtype; the coefficients follow from a few numbers per vector (NuSLERP) or an
n-by-n Gram matrix (multi-SLERP, Karcher); a second pass writes the combination.
The operands stay as stored and are converted a piece at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import numpy as np
from pydantic import Field

from sdrecipe.methods.buffers import result_tensor
from sdrecipe.methods.classic import Ratio
from sdrecipe.methods.geometry import _row_pieces
from sdrecipe.methods.registry import OWN_BYTES, merge_method
from sdrecipe.methods.task_vectors import Positive, TaskVectors, pieces

if TYPE_CHECKING:
    import torch
    from torch import Tensor

Count = Annotated[int, Field(ge=0)]

# mergekit's NuSLERP divides by norms clamped to at least this, and interpolates
# linearly where 1 - cos²θ <= NUSLERP_EPS² (evaluated, as there, in the compute dtype).
NUSLERP_NORM_FLOOR = 1e-7
NUSLERP_EPS = 1e-8


class _Operands:
    """The models, or with a base their task vectors, a piece at a time in `dtype`."""

    def __init__(self, models: Sequence[Tensor], base: Tensor | None, dtype: torch.dtype):
        self.shape = models[0].shape
        self.dtype = dtype
        self.models = [model.reshape(-1) for model in models]
        self.numel = self.models[0].numel()
        self.device = self.models[0].device
        self.deltas = None if base is None else TaskVectors(base, tuple(models), dtype)

    def base_piece(self, piece: slice) -> Tensor | None:
        """The base on `piece` (read only), or None without a base."""
        return None if self.deltas is None else self.deltas.base_piece(piece)

    def get(self, index: int, piece: slice, base_piece: Tensor | None) -> Tensor:
        """Operand `index` on `piece`; read only (it may be the operand itself)."""
        if self.deltas is None or base_piece is None:
            return self.models[index][piece].to(self.dtype)
        return self.deltas.delta(index, piece, base_piece)  # a new tensor

    def gram(self) -> np.ndarray:
        """The operands' inner products, in float64 from float64 products (each
        summed in the same order, so that x·(-x) is exactly -(x·x)); summed on the
        operands' device, and the count-by-count matrix brought to the CPU once."""
        import torch

        count = len(self.models)
        sums = torch.zeros(count, count, dtype=torch.float64, device=self.device)
        for piece in pieces(self.numel):
            base_piece = self.base_piece(piece)
            wide = torch.stack(
                [self.get(i, piece, base_piece).to(torch.float64) for i in range(count)]
            )
            for i in range(count):
                sums[i, : i + 1] += (wide[: i + 1] * wide[i]).sum(dim=1)
        gram = sums.cpu().numpy()
        return np.tril(gram) + np.tril(gram, -1).T

    def combination(self, coefficients: np.ndarray) -> Tensor:
        """Σ cᵢ·operandᵢ, plus the base if there is one, in the compute dtype."""

        weights = [float(c) for c in coefficients]
        out = result_tensor(self.numel, self.dtype, self.device)
        for piece in pieces(self.numel):
            base_piece = self.base_piece(piece)
            total = self.get(0, piece, base_piece).mul(weights[0])
            for i in range(1, len(weights)):
                total.add_(self.get(i, piece, base_piece), alpha=weights[i])
            out[piece] = total if base_piece is None else total.add_(base_piece)
        return out.reshape(self.shape)


def _norm(coefficients: np.ndarray, gram: np.ndarray) -> float:
    """The norm of Σ cᵢ·vᵢ, given the vᵢ's Gram matrix."""
    return math.sqrt(max(float(coefficients @ gram @ coefficients), 0.0))


# --- NuSLERP ---------------------------------------------------------------------------


@merge_method(elementwise=False, device=OWN_BYTES)  # sin, acos round by device
def nuslerp(
    a: Tensor,
    b: Tensor,
    *,
    t: Ratio = 0.5,
    flatten: bool = True,
    row_wise: bool = False,
    dtype: torch.dtype,
) -> Tensor:
    """mergekit's NuSLERP: sin((1 - t)θ)/sin θ·A + sin(tθ)/sin θ·B with θ the
    angle between A and B, as one vector (`flatten`), else for each vector
    along the last dimension, or along dim 0 when `row_wise`; linear where
    1 - cos²θ <= 1e-16 in the compute dtype."""
    return _nuslerp((a, b), None, t, flatten, row_wise, dtype)


@merge_method(elementwise=False, device=OWN_BYTES)
def nuslerp_delta(
    base: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    t: Ratio = 0.5,
    flatten: bool = True,
    row_wise: bool = False,
    dtype: torch.dtype,
) -> Tensor:
    """mergekit's NuSLERP with a base model: base + nuslerp(A - base, B - base)."""
    return _nuslerp((a, b), base, t, flatten, row_wise, dtype)


def _layout(shape: torch.Size, flatten: bool, row_wise: bool) -> tuple[int, int, bool]:
    """(rows, width, by_column): the tensor as a rows-by-width matrix whose rows,
    or columns when `by_column`, are the vectors NuSLERP pairs."""
    numel = shape.numel()
    if flatten or len(shape) <= 1:
        return 1, numel, False
    if row_wise:  # mergekit: transpose(0, -1), vectors along the last dimension
        return shape[0], numel // shape[0], True
    return numel // shape[-1], shape[-1], False


def _nuslerp(
    pair: tuple[Tensor, Tensor],
    base: Tensor | None,
    t: float,
    flatten: bool,
    row_wise: bool,
    dtype: torch.dtype,
) -> Tensor:
    import torch

    operands = _Operands(pair, base, dtype)
    out = result_tensor(operands.numel, dtype, operands.device)
    if operands.numel == 0:
        return out.reshape(operands.shape)
    rows, width, by_column = _layout(operands.shape, flatten, row_wise)
    matrix = (1, -1) if rows == 1 else (-1, width)
    axis = 0 if by_column else 1

    def read(piece: slice) -> tuple[Tensor | None, Tensor, Tensor]:
        base_piece = operands.base_piece(piece)
        x, y = (operands.get(i, piece, base_piece).reshape(matrix) for i in (0, 1))
        return base_piece, x, y

    def statistics(x: Tensor, y: Tensor) -> Tensor:
        wide_x, wide_y = x.to(torch.float64), y.to(torch.float64)
        return torch.stack(
            [(wide_x * wide_y).sum(axis), wide_x.square().sum(axis), wide_y.square().sum(axis)]
        )

    def write(piece: slice, base_piece: Tensor | None, x: Tensor, y: Tensor, weights: Tensor):
        weight_a, weight_b = (w.reshape((1, -1) if by_column else (-1, 1)) for w in weights)
        total = x * weight_a
        total.add_(y * weight_b)
        if base_piece is not None:
            total.add_(base_piece.reshape(matrix))
        out[piece] = total.reshape(-1)

    if rows > 1 and not by_column:
        # Pieces of whole rows: each piece's vectors are complete, one pass does.
        for piece in _row_pieces(rows, width):
            base_piece, x, y = read(piece)
            write(piece, base_piece, x, y, _nuslerp_weights(statistics(x, y), t, dtype))
        return out.reshape(operands.shape)
    # One vector across pieces, or columns: sums over every piece first.
    totals = torch.zeros(3, width if by_column else 1, dtype=torch.float64, device=operands.device)
    for piece in _row_pieces(rows, width):
        where = piece if by_column and rows == 1 else slice(None)
        totals[:, where] += statistics(*read(piece)[1:])
    weights = _nuslerp_weights(totals, t, dtype)
    for piece in _row_pieces(rows, width):
        where = piece if by_column and rows == 1 else slice(None)
        write(piece, *read(piece), weights[:, where])
    return out.reshape(operands.shape)


def _nuslerp_weights(statistics: Tensor, t: float, dtype: torch.dtype) -> Tensor:
    """mergekit's NuSLERP coefficients of A and B (2 by vectors, in `dtype`) from
    each pair's A·B, |A|² and |B|² (float64)."""
    import torch

    dot, squares_a, squares_b = statistics
    norm_a = squares_a.sqrt().clamp(min=NUSLERP_NORM_FLOOR)
    norm_b = squares_b.sqrt().clamp(min=NUSLERP_NORM_FLOOR)
    cosine = (dot / (norm_a * norm_b)).clamp(-1.0, 1.0)
    # mergekit decides in the tensors' dtype: in float32, where cos θ rounds to ±1.
    rounded = cosine.to(dtype)
    colinear = (1.0 - rounded.square()) <= NUSLERP_EPS**2
    theta = torch.acos(torch.where(colinear, 0.0, cosine))
    sin_theta = torch.where(colinear, 1.0, torch.sin(theta))
    weight_a = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    weight_b = torch.where(colinear, t, torch.sin(t * theta) / sin_theta)
    return torch.stack([weight_a, weight_b]).to(dtype)


# --- multi-SLERP -------------------------------------------------------------------------


# The Gram matrices' sums run on the device: their order, so their bytes, are its own.
@merge_method(elementwise=False, min_models=2, device=OWN_BYTES)
def multislerp(
    *models: Tensor,
    normalize_weights: bool = True,
    eps: Positive = 1e-8,
    dtype: torch.dtype,
) -> Tensor:
    """mergekit's multi-SLERP of equal weights (1/n, or 1 each without
    `normalize_weights`): the units Mᵢ/(|Mᵢ| + eps) are averaged, the mean is
    normalised, their tangents there averaged and mapped back to the sphere
    (tangent norm + eps), and the result scaled by the weighted sum of the
    norms. Where the mean of the units is shorter than `eps`, the weighted sum
    of the models (mergekit: two models only; more raise)."""
    return _multislerp(models, None, normalize_weights, eps, dtype)


@merge_method(elementwise=False, min_models=2, device=OWN_BYTES)
def multislerp_delta(
    base: Tensor,
    *models: Tensor,
    normalize_weights: bool = True,
    eps: Positive = 1e-8,
    dtype: torch.dtype,
) -> Tensor:
    """mergekit's multi-SLERP with a base model: base + multislerp of the task
    vectors Mᵢ - base. A single model is returned as it is."""
    return _multislerp(models, base, normalize_weights, eps, dtype)


def _multislerp(
    models: Sequence[Tensor],
    base: Tensor | None,
    normalize_weights: bool,
    eps: float,
    dtype: torch.dtype,
) -> Tensor:
    if len(models) == 1:
        return models[0].to(dtype, copy=True)
    operands = _Operands(models, base, dtype)
    gram = operands.gram()
    count = len(models)
    # Vectors are held as coefficients over the units Mᵢ/(|Mᵢ| + eps).
    weights = np.full(count, 1.0 / count if normalize_weights else 1.0)
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    scale = 1.0 / (norms + eps)
    unit_gram = gram * np.outer(scale, scale)
    mean_norm = _norm(weights, unit_gram)
    if mean_norm < eps:
        return operands.combination(weights)
    mean = weights / mean_norm
    tangent = weights - (weights @ (unit_gram @ mean)) * mean
    tangent_norm = _norm(tangent, unit_gram) + eps
    direction = math.cos(tangent_norm) * mean + (math.sin(tangent_norm) / tangent_norm) * tangent
    return operands.combination(direction * float(norms @ weights) * scale)


# --- Karcher mean ------------------------------------------------------------------------


@merge_method(elementwise=False, min_models=2, device=OWN_BYTES)
def karcher(
    *models: Tensor, max_iter: Count = 10, tol: Positive = 1e-5, dtype: torch.dtype
) -> Tensor:
    """mergekit's Karcher mean: the Riemannian mean of the units Mᵢ/|Mᵢ| of the
    models of norm above `tol` (equal weights), from their normalised mean by
    at most `max_iter` steps along the mean of the log maps (units within
    `tol` radians left out), until that is shorter than `tol`; scaled by the
    mean norm of all the models."""
    import torch

    operands = _Operands(models, None, dtype)
    gram = operands.gram()
    count = len(models)
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    valid = np.flatnonzero(norms > tol)
    if valid.size == 0:
        return torch.zeros(operands.shape, dtype=dtype, device=operands.device)
    # The mean and the tangent are held as coefficients over the valid units.
    unit_gram = gram[np.ix_(valid, valid)] / np.outer(norms[valid], norms[valid])
    weights = np.full(valid.size, 1.0 / valid.size)
    mean = weights.copy()
    mean_norm = _norm(mean, unit_gram)
    mean = np.eye(valid.size)[0] if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        dots = np.clip(unit_gram @ mean, -1.0, 1.0)
        theta = np.arccos(dots)
        moving = theta >= tol
        ratio = np.divide(theta, np.sin(theta), out=np.zeros_like(theta), where=moving)
        factors = weights * ratio
        tangent = factors - (factors @ dots) * mean
        tangent_norm = _norm(tangent, unit_gram)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + (math.sin(tangent_norm) / tangent_norm) * tangent
        unit_norm = _norm(mean, unit_gram)
        if unit_norm > tol:
            mean = mean / unit_norm
    coefficients = np.zeros(count)
    coefficients[valid] = float(norms.sum() / count) * mean / norms[valid]
    return operands.combination(coefficients)
