"""Whole-tensor methods that treat a tensor as a vector or a matrix: SLERP and rotate."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from sdrecipe.methods.buffers import result_tensor
from sdrecipe.methods.classic import Ratio
from sdrecipe.methods.registry import OWN_BYTES, merge_method
from sdrecipe.methods.task_vectors import PIECE_ELEMENTS, pieces

if TYPE_CHECKING:
    import torch
    from torch import Tensor


@merge_method(elementwise=False, device=OWN_BYTES)  # sin, acos round by device
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
    dot = torch.zeros(rows, dtype=torch.float64, device=a.device)
    squares_a = torch.zeros_like(dot)
    squares_b = torch.zeros_like(dot)
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
    out = result_tensor(flat_a.numel(), dtype, a.device)
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


@merge_method(elementwise=False, device=OWN_BYTES)  # SVD, eig round by device
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
    interpolated by `alpha`.

    Computed in float64 (the decomposition, the powers and their application)
    and rounded once. For fewer rows than columns, centring makes the rows of
    each matrix sum to 0, so one pair of Procrustes frames is left undetermined
    at centralization 1 (sd-mecha takes whatever rounding gives it, which moves
    the result by percents); here it is its limit as centralization → 1."""
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
    if shape[0] >= shape[1]:
        fractional = not math.isclose(alignment, round(alignment))
        out = _rotate_tall(matrix_a, matrix_b, alignment, alpha, centralization, fractional)
    else:
        out = _rotate_wide(matrix_a, matrix_b, alignment, alpha, centralization)
    return out.reshape(a.shape)


def _rotate_tall(
    a: Tensor, b: Tensor, alignment: float, alpha: float, centralization: float, fractional: bool
) -> Tensor:
    """rotate for at least as many rows as columns: Q is columns by columns, and
    the rows are converted to float64 and transformed a range at a time."""
    import torch

    f64 = torch.float64
    rows, columns = a.shape
    ranges = _row_ranges(rows, columns)
    mean_a = _column_means(a, ranges) * centralization
    mean_b = _column_means(b, ranges) * centralization
    cross = torch.zeros(columns, columns, dtype=f64, device=a.device)
    for piece in ranges:
        cross += (a[piece].to(f64) - mean_a).T @ (b[piece].to(f64) - mean_b)
    u, _, vh = torch.linalg.svd(cross)
    if fractional:
        u[:, -1] *= torch.linalg.det(u @ vh).sign()
    rotation = u @ vh
    forward = _orthogonal_power(rotation, alignment)
    # A is interpolated towards B·Q⁻¹ before Q^alignment: B·(Q⁻¹·Q^alignment).
    backward = rotation.T @ forward if alpha != 0.0 else None
    shift = torch.lerp(mean_a, mean_b, alignment)
    out = result_tensor(rows * columns, a.dtype, a.device).reshape(rows, columns)
    for piece in ranges:
        moved = (a[piece].to(f64) - mean_a) @ forward
        if backward is not None:
            moved = torch.lerp(moved, (b[piece].to(f64) - mean_b) @ backward, alpha)
        out[piece] = moved.add_(shift)
    return out


def _rotate_wide(
    a: Tensor, b: Tensor, alignment: float, alpha: float, centralization: float
) -> Tensor:
    """rotate for fewer rows than columns, sd-mecha's low-rank form, in float64."""
    import torch

    f64 = torch.float64
    a64, b64 = a.to(f64), b.to(f64)  # never modified: they may be the operands
    raw_mean_a, raw_mean_b = a64.mean(0), b64.mean(0)
    mean_a, mean_b = raw_mean_a * centralization, raw_mean_b * centralization
    centred_a, centred_b = a64 - mean_a, b64 - mean_b
    # B's row space: that of the centred B (the same space unless centralization is
    # 1, where the centred rows lose a dimension), or its limit there.
    frame, _ = torch.linalg.qr(b64.T)
    u, _, vh = torch.linalg.svd(centred_a.T @ (centred_b @ frame), full_matrices=False)
    if abs(1.0 - centralization) < CENTRED_LIMIT:
        _settle_last_pair(u, vh, raw_mean_a, frame.T @ raw_mean_b, a64, b64)
    transform = _LowRankRotation(u, frame @ vh.T)
    if alpha != 0.0:
        centred_a = torch.lerp(centred_a, transform.apply(centred_b, -1.0), alpha)
    moved = transform.apply(centred_a, alignment)
    return (moved + torch.lerp(mean_a, mean_b, alignment)).to(a.dtype)


# Within this of centralization 1, the wide form's undetermined frame pair is its
# limit there: it differs from the exact pair by about (1 - centralization)², 1e-8
# here, where float64's own error in that pair grows past 1e-8.
CENTRED_LIMIT = 1e-4


def _settle_last_pair(
    u: Tensor, vh: Tensor, mean_a: Tensor, mean_b: Tensor, a: Tensor, b: Tensor
) -> None:
    """Set the last singular pair of Aᶜᵀ·Bᶜ·F (F: B's row frame) to its limit as
    centralization → 1, in place: there Aᶜᵀ·Bᶜ gains r·(1 - c)²·mean_a·mean_bᵀ, so
    the pair is the part of A's mean row outside the other left vectors and the
    part of B's (in F's coordinates) outside the other right vectors, both facing
    their means. Left as LAPACK gives it where a mean has no such part (the rows
    of A or B are dependent: then nothing determines it)."""
    rows = a.shape[0]
    kept = u[:, :-1]
    rest = mean_a - kept @ (kept.T @ mean_a)
    rest -= kept @ (kept.T @ rest)  # twice is enough
    facing = vh[-1] @ mean_b
    threshold = 1e-10 / math.sqrt(rows)
    if rest.norm() <= threshold * a.norm() or facing.abs() <= threshold * b.norm():
        return
    u[:, -1] = rest / rest.norm()
    if facing < 0:
        vh[-1] = -vh[-1]


def _row_ranges(rows: int, columns: int) -> list[slice]:
    """Ranges of whole rows of about `PIECE_ELEMENTS` elements each."""
    step = max(1, PIECE_ELEMENTS // max(1, columns))
    return [slice(start, min(rows, start + step)) for start in range(0, rows, step)]


def _column_means(matrix: Tensor, ranges: list[slice]) -> Tensor:
    """The mean of `matrix`'s rows, summed in float64."""
    import torch

    total = torch.zeros(matrix.shape[1], dtype=torch.float64, device=matrix.device)
    for piece in ranges:
        total += matrix[piece].sum(0, dtype=torch.float64)
    return total / matrix.shape[0]


class _LowRankRotation:
    """For fewer rows than columns, sd-mecha's form: x ↦ x - x·V·Vᵀ + x·U·Vᵀ for a
    frame V of B's row space and U of A's. A fractional power moves along the
    Stiefel geodesic from V to U. Frames and x in float64."""

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
            logarithm = _stiefel_log(self.v, self.u)
            start = _stiefel_exp(self.v, logarithm * ((1.0 - power) / 2.0))
            end = _stiefel_exp(self.v, logarithm * ((1.0 + power) / 2.0))
        return x - (x @ start) @ start.T + (x @ end) @ start.T


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
    corner = torch.zeros(k, k, dtype=a.dtype, device=a.device)
    block = torch.cat([torch.cat([a, -r.T], dim=1), torch.cat([r, corner], dim=1)])
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
    complement = torch.eye(p + k, dtype=m.dtype, device=m.device)[:, p:] - stacked @ stacked[p:].T
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
        half = 0.5 * torch.eye(k, dtype=v.dtype, device=v.device)
        s = logarithm[p:, :p] @ logarithm[p:, :p].T / 12.0 - half
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
