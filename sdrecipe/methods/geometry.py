"""Whole-tensor methods that treat a tensor as a vector or a matrix: SLERP and rotate."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from sdrecipe.methods.classic import Ratio
from sdrecipe.methods.registry import merge_method
from sdrecipe.methods.task_vectors import PIECE_ELEMENTS, pieces

if TYPE_CHECKING:
    import torch
    from torch import Tensor


@merge_method(elementwise=False)
def slerp(
    a: Tensor,
    b: Tensor,
    *,
    t: Ratio = 0.5,
    dot_threshold: Ratio = 0.9995,
    eps: Annotated[float, Field(ge=0.0)] = 1e-8,
    per_row: bool = False,
    dtype: torch.dtype,
) -> Tensor:
    """Spherical interpolation, mergekit's definition: with the angle θ between
    A and B as flattened vectors (each row of dim 0 when `per_row`, as mergekit
    0.1.5 does), sin((1 - t)θ)/sin θ·A + sin(tθ)/sin θ·B; a linear
    interpolation where |cos θ| > `dot_threshold`. A norm of at most `eps`
    counts as 1."""
    import torch

    rows = a.shape[0] if per_row and a.dim() > 0 else 1
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    width = max(1, flat_a.numel() // rows)
    matrix = (1, -1) if rows == 1 else (-1, width)  # one row: pieces of any length
    dot = torch.zeros(rows, dtype=torch.float64)
    squares_a = torch.zeros(rows, dtype=torch.float64)
    squares_b = torch.zeros(rows, dtype=torch.float64)
    for piece in _row_pieces(rows, width):
        x = flat_a[piece].to(dtype).reshape(matrix)
        y = flat_b[piece].to(dtype).reshape(matrix)
        where = _rows_of(piece, width)
        dot[where] += (x * y).sum(dim=1, dtype=torch.float64)
        squares_a[where] += x.square().sum(dim=1, dtype=torch.float64)
        squares_b[where] += y.square().sum(dim=1, dtype=torch.float64)
    norm_a, norm_b = squares_a.sqrt(), squares_b.sqrt()
    norm_a = torch.where(norm_a > eps, norm_a, 1.0)
    norm_b = torch.where(norm_b > eps, norm_b, 1.0)
    cosine = (dot / (norm_a * norm_b)).clamp(-1.0, 1.0)
    linear = cosine.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0.0, cosine))
    sin_theta = torch.where(linear, 1.0, torch.sin(theta))
    weight_a = torch.where(linear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    weight_b = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    weight_a, weight_b = weight_a.to(dtype), weight_b.to(dtype)
    out = torch.empty(flat_a.numel(), dtype=dtype)
    for piece in _row_pieces(rows, width):
        where = _rows_of(piece, width)
        x = flat_a[piece].to(dtype, copy=True).reshape(matrix).mul_(weight_a[where, None])
        y = flat_b[piece].to(dtype, copy=True).reshape(matrix).mul_(weight_b[where, None])
        out[piece] = x.add_(y).reshape(-1)
    return out.reshape(a.shape)


def _row_pieces(rows: int, width: int) -> list[slice]:
    """Flat ranges of whole rows (or, for one row, of any length)."""
    if rows == 1:
        return list(pieces(width))
    per_piece = max(1, PIECE_ELEMENTS // width)
    return [
        slice(start * width, min(rows, start + per_piece) * width)
        for start in range(0, rows, per_piece)
    ]


def _rows_of(piece: slice, width: int) -> slice:
    """The rows a flat range of whole rows covers (row 0 for a single row's range)."""
    first = piece.start // width
    return slice(first, max(first + 1, piece.stop // width))


@merge_method(elementwise=False)
def rotate(
    a: Tensor,
    b: Tensor,
    *,
    alignment: float = 1.0,
    alpha: float = 0.0,
    centralization: float = 1.0,
) -> Tensor:
    """sd-mecha's rotate: align A with B by an orthogonal transform Q (the
    orthogonal Procrustes solution between their row-centred matrices), applied
    `alignment` times (fractional: the principal power, reflections cancelled),
    after interpolating A towards B·Q⁻¹ by `alpha`; then the rows' means are
    interpolated by `alignment`. alignment = alpha = 0 gives A, both 1 give B.
    Tensors of at most one dimension, or equal in half precision, are
    interpolated by `alpha`."""
    import torch

    if alignment == 0.0 and alpha == 0.0:
        return a.clone()
    if alignment == 1.0 and alpha == 1.0:
        return b.clone()
    if a.dim() <= 1 or torch.allclose(a.half(), b.half()):
        return torch.lerp(a, b, alpha)
    if a.dim() == 4 and a.shape[-2:].numel() != 1:
        shape = (a.shape[:2].numel(), a.shape[2:].numel())  # convolution: kernel positions
    else:
        shape = (a.shape[0], a.shape[1:].numel())
    matrix_a, matrix_b = a.reshape(shape), b.reshape(shape)
    mean_a = matrix_a.mean(0) * centralization
    mean_b = matrix_b.mean(0) * centralization
    matrix_a, matrix_b = matrix_a - mean_a, matrix_b - mean_b
    fractional = not math.isclose(alignment, round(alignment))
    transform = _procrustes(matrix_a, matrix_b, cancel_reflection=fractional)
    if alpha != 0.0:
        matrix_a = torch.lerp(matrix_a, transform.apply(matrix_b, -1.0), alpha)
    matrix_a = transform.apply(matrix_a, alignment)
    return (matrix_a + torch.lerp(mean_a, mean_b, alignment)).reshape(a.shape)


class _FullRotation:
    """x ↦ x·Q^power for an orthogonal Q."""

    def __init__(self, rotation: Tensor):
        self.rotation = rotation

    def apply(self, x: Tensor, power: float) -> Tensor:
        return x if power == 0.0 else x @ _orthogonal_power(self.rotation, power)


class _LowRankRotation:
    """For fewer rows than columns, sd-mecha's form: x ↦ x - x·V·Vᵀ + x·U·Vᵀ moves
    the frame V (a's row space) to U and keeps its complement. A fractional
    power moves along the Stiefel geodesic from V to U."""

    def __init__(self, u: Tensor, v: Tensor):
        self.u = u
        self.v = v

    def apply(self, x: Tensor, power: float) -> Tensor:
        if power == 0.0:
            return x
        if power == 1.0:
            start, end = self.v, self.u
        elif power == -1.0:
            start, end = self.u, self.v
        else:
            # In float64: the iteration drifts off the manifold in float32.
            v, u = self.v.double(), self.u.double()
            logarithm = _stiefel_log(v, u)
            start = _stiefel_exp(v, logarithm * ((1.0 - power) / 2.0)).to(x.dtype)
            end = _stiefel_exp(v, logarithm * ((1.0 + power) / 2.0)).to(x.dtype)
        return x - (x @ start) @ start.T + (x @ end) @ start.T


def _procrustes(a: Tensor, b: Tensor, cancel_reflection: bool) -> _FullRotation | _LowRankRotation:
    """The orthogonal Q that minimises ‖a·Q - b‖ (on a's row space when a is wide)."""
    import torch

    rows, columns = a.shape
    if rows >= columns:
        u, _, vh = torch.linalg.svd(a.T @ b, full_matrices=False)
        if cancel_reflection:
            u[:, -1] *= torch.linalg.det(u @ vh).sign()
        return _FullRotation(u @ vh)
    b_q, b_r = torch.linalg.qr(b.T)
    u, _, vh = torch.linalg.svd(a.T @ b_r.T, full_matrices=False)
    return _LowRankRotation(u, b_q @ vh.T)


def _orthogonal_power(q: Tensor, power: float) -> Tensor:
    """Q to `power`: exact for integers, by eigendecomposition (principal branch) otherwise."""
    import torch

    if power == 1.0:
        return q
    if power == -1.0:
        return q.T
    if math.isclose(power, round(power)):
        return torch.linalg.matrix_power(q, round(power))
    values, vectors = torch.linalg.eig(q)
    return ((vectors * values.pow(power).unsqueeze(-2)) @ vectors.mH).real.to(q.dtype)


def _positive_qr(x: Tensor) -> tuple[Tensor, Tensor]:
    """QR with R's diagonal made non-negative (unique for full rank)."""
    import torch

    q, r = torch.linalg.qr(x)
    signs = torch.sign(r.diagonal())
    signs[signs == 0] = 1.0
    return q * signs, r * signs[:, None]


def _stiefel_exp(frame: Tensor, tangent: Tensor) -> Tensor:
    """The point of the Stiefel manifold reached from `frame` along `tangent`
    (canonical metric; Edelman, Arias and Smith)."""
    import torch

    n, p = frame.shape
    k = min(n - p, p)
    a = frame.T @ tangent
    q, r = _positive_qr(tangent - frame @ a)
    q, r = q[:, :k], r[:k, :]
    block = torch.cat(
        [torch.cat([a, -r.T], dim=1), torch.cat([r, torch.zeros(k, k, dtype=a.dtype)], dim=1)]
    )
    moved = torch.linalg.matrix_exp(block)
    return frame @ moved[:p, :p] + q @ moved[p:, :p]


def _stiefel_log(start: Tensor, end: Tensor, eps: float = 1e-8, max_iter: int = 100) -> Tensor:
    """The tangent at `start` whose geodesic reaches `end`: Zimmermann's
    algorithm (2017), solving for the block that makes log(V) skew with a zero corner."""
    import torch

    n, p = start.shape
    k = min(n - p, p)
    m = start.T @ end
    q, normal = _positive_qr(end - start @ m)
    q, normal = q[:, :k], normal[:k, :]
    stacked = torch.cat([m, normal])  # (p + k) by p, orthonormal columns
    complement = torch.eye(p + k, dtype=m.dtype)[:, p:] - stacked @ stacked[p:].T
    completion, _ = torch.linalg.qr(complement)
    v = torch.cat([stacked, completion], dim=1)
    # Rotate the completion so that its lower block is diagonal and non-negative.
    left, sigma, right_h = torch.linalg.svd(v[p:, p:])
    q = q @ left
    v[p:, :p] = left.T @ normal
    v[:p, p:] = v[:p, p:] @ right_h.T
    v[p:, p:] = torch.diag(sigma)
    if torch.linalg.det(v) < 0:
        v[:, -1] *= -1.0
    for _ in range(max_iter):
        logarithm = _real_logm(v)
        corner = logarithm[p:, p:]
        if torch.linalg.matrix_norm(corner) <= eps:
            break
        s = logarithm[p:, :p] @ logarithm[p:, :p].T / 12.0 - 0.5 * torch.eye(k, dtype=v.dtype)
        values, vectors = torch.linalg.eigh(s)
        solved = vectors @ ((vectors.T @ corner @ vectors) / (values[:, None] + values)) @ vectors.T
        v[:, p:] = v[:, p:] @ torch.linalg.matrix_exp(solved)
    return start @ logarithm[:p, :p] + q @ logarithm[p:, :p]


def _real_logm(matrix: Tensor) -> Tensor:
    """The principal matrix logarithm of a real matrix with no eigenvalue on (-inf, 0]."""
    import torch

    values, vectors = torch.linalg.eig(matrix)
    return torch.linalg.solve(vectors, vectors * values.log().unsqueeze(-2), left=False).real.to(
        matrix.dtype
    )
