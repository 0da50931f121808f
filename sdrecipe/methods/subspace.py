"""SVD merges of task vectors: Iso-C and Iso-CTS (arXiv 2502.04959) and
TSV-Merge (arXiv 2412.00081).

Each reads a key's task vectors Δᵢ = Mᵢ - base as matrices: a tensor of two or
more dimensions as its first dimension by the rest (a convolution as
out by in·k·k). Tensors of fewer dimensions get base + alpha·mean(Δᵢ), as both
papers' code does for every parameter that is not a matrix.

Everything is decomposed in float64, from the operands as stored, and the
result is rounded once to the compute dtype. These methods give every kept
singular direction the same weight (Iso) or re-orthogonalise bases built from
them (TSV), so the small singular values and their vectors count as much as the
large ones; in float32 a direction of singular value sᵢ is off by about
1e-7·s₁/sᵢ.

A singular value at most max(m, n)·ε·Σᵢ‖Δᵢ‖ counts as zero (ε: float64's): its
singular vectors are not determined by the task vectors (LAPACK picks any), and
the authors' code would give such a direction a full share of the isotropic
spectrum. Here it is left out; so are the null directions of the bases that
TSV and Iso-CTS orthogonalise (their polar factor is taken on its range). Only
rank-deficient task vectors (e.g. from LoRAs, or none at all) meet either.
The SVDs are LAPACK's, deterministic, with no randomised step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdrecipe.methods.buffers import result_tensor
from sdrecipe.methods.classic import Ratio
from sdrecipe.methods.registry import OWN_BYTES, merge_method
from sdrecipe.methods.task_vectors import PIECE_ELEMENTS

if TYPE_CHECKING:
    import torch
    from torch import Tensor

EPSILON = 2.0**-52  # float64's


class _Deltas:
    """A key's task vectors, produced as float64 matrices, and the result
    base + alpha·(their merge), rounded once to `dtype`."""

    def __init__(self, base: Tensor, models: tuple[Tensor, ...], dtype: torch.dtype):
        self.shape = base.shape
        self.dtype = dtype
        self.count = len(models)
        if base.dim() >= 2 and base.numel() > 0:
            self.matrix: tuple[int, int] | None = (base.shape[0], base[0].numel())
            self.base = base.reshape(self.matrix)
            self.models = [model.reshape(self.matrix) for model in models]
        else:
            self.matrix = None
            self.base = base.reshape(-1)
            self.models = [model.reshape(-1) for model in models]

    @property
    def rank(self) -> int:
        """r = min(m, n) of the matrices."""
        assert self.matrix is not None
        return min(self.matrix)

    def delta(self, index: int) -> Tensor:
        """Task vector `index` as a new float64 matrix."""
        import torch

        f64 = torch.float64
        out = result_tensor(self.base.numel(), f64, self.base.device).reshape(self.base.shape)
        for rows in self.row_ranges():
            torch.sub(self.models[index][rows].to(f64), self.base[rows].to(f64), out=out[rows])
        return out

    def total(self) -> tuple[Tensor, float]:
        """Σᵢ Δᵢ (float64), and Σᵢ ‖Δᵢ‖ (Frobenius): the scale of every matrix decomposed."""
        total = self.delta(0)
        scale = total.norm().item()
        for index in range(1, self.count):
            delta = self.delta(index)
            scale += delta.norm().item()
            total += delta
        return total, scale

    def tolerance(self, scale: float) -> float:
        """Singular values at most this count as zero."""
        assert self.matrix is not None
        return max(self.matrix) * EPSILON * scale

    def row_ranges(self) -> list[slice]:
        rows = self.base.shape[0]
        step = max(1, PIECE_ELEMENTS // max(1, self.base[0].numel())) if self.matrix else rows
        return [slice(start, min(rows, start + step)) for start in range(0, rows, step)]

    def mean_result(self, alpha: float) -> Tensor:
        """base + alpha·mean(Δᵢ), for the tensors that are not matrices."""
        import torch

        f64 = torch.float64
        base = self.base.to(f64)
        total = torch.zeros_like(base)
        for model in self.models:
            total += model.to(f64) - base
        return (base + total * (alpha / self.count)).to(self.dtype).reshape(self.shape)

    def result(self, left: Tensor, right: Tensor, alpha: float) -> Tensor:
        """base + alpha·left·right, a range of rows at a time."""
        import torch

        out = result_tensor(self.base.numel(), self.dtype, self.base.device)
        out = out.reshape(self.base.shape)
        for rows in self.row_ranges():
            out[rows] = (left[rows] @ right).mul_(alpha).add_(self.base[rows].to(torch.float64))
        return out.reshape(self.shape)


def _svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    import torch

    return torch.linalg.svd(matrix, full_matrices=False)


def _polar(matrix: Tensor) -> Tensor:
    """The orthogonal polar factor P·Qᵀ of `matrix` = P·Σ·Qᵀ, on its range: the
    directions of a zero singular value (at most max(m, n)·ε·s₁) are left out."""
    if matrix.numel() == 0:
        return matrix.clone()
    p, s, qh = _svd(matrix)
    keep = s > max(matrix.shape) * EPSILON * s[0].item()
    return p[:, keep] @ qh[keep]


@merge_method(elementwise=False, device=OWN_BYTES)  # SVDs round by device
def iso_c(base: Tensor, *models: Tensor, alpha: float = 1.0, dtype: torch.dtype) -> Tensor:
    """Iso-C (arXiv 2502.04959): with Δ = Σᵢ Δᵢ = U·Σ·Vᵀ (the sum of the task
    vectors, as the paper's task arithmetic), base + alpha·s̄·U·Vᵀ, where s̄ is the
    mean of Δ's min(m, n) singular values: the spectrum made flat. Matrices are
    tensors of two or more dimensions (convolutions as out by in·k·k); the rest
    get base + alpha·mean(Δᵢ), as the authors' code. SVD in float64."""
    deltas = _Deltas(base, models, dtype)
    if deltas.matrix is None:
        return deltas.mean_result(alpha)
    total, scale = deltas.total()
    u, s, vh = _svd(total)
    keep = s > deltas.tolerance(scale)
    mean = s.mean().item()
    return deltas.result(u[:, keep] * mean, vh[keep], alpha)


@merge_method(elementwise=False, device=OWN_BYTES)
def iso_cts(
    base: Tensor,
    *models: Tensor,
    alpha: float = 1.0,
    common_fraction: Ratio = 0.8,
    dtype: torch.dtype,
) -> Tensor:
    """Iso-CTS (arXiv 2502.04959, Algorithm 1): of the rank r = min(m, n), k
    directions come from the common subspace (the top k singular vectors of
    Δ = Σᵢ Δᵢ) and p from each of the T task vectors (the top p of Δᵢ with the
    common subspace projected out, (I - Uₖ·Uₖᵀ)·Δᵢ), k + T·p = r; the left and
    right bases are orthogonalised (their polar factors) and given one singular
    value s̄, the mean of those k + T·p singular values: base + alpha·s̄·U*·V*ᵀ.
    p = round((r - ⌊common_fraction·r⌋)/T) (half to even), at most ⌊r/T⌋, as
    the authors' code rounds; k = r - T·p. Tensors that are not matrices get
    base + alpha·mean(Δᵢ). SVDs in float64."""
    import torch

    deltas = _Deltas(base, models, dtype)
    if deltas.matrix is None:
        return deltas.mean_result(alpha)
    rank, count = deltas.rank, deltas.count
    specific = min(round((rank - int(rank * common_fraction)) / count), rank // count)
    common = rank - count * specific
    total, scale = deltas.total()
    tolerance = deltas.tolerance(scale)
    u, s, vh = _svd(total)
    kept = s[:common] > tolerance
    lefts, values, rights = [u[:, :common][:, kept]], [s[:common]], [vh[:common][kept]]
    del total
    basis = lefts[0]
    for index in range(count if specific > 0 else 0):
        projected = deltas.delta(index)
        projected -= basis @ (basis.T @ projected)
        u_t, s_t, vh_t = _svd(projected)
        kept = s_t[:specific] > tolerance
        lefts.append(u_t[:, :specific][:, kept])
        values.append(s_t[:specific])
        rights.append(vh_t[:specific][kept])
    mean = torch.cat(values).sum().item() / rank
    left = _polar(torch.cat(lefts, dim=1))
    right = _polar(torch.cat(rights).T).T
    return deltas.result(left * mean, right, alpha)


@merge_method(elementwise=False, device=OWN_BYTES)
def tsv(
    base: Tensor,
    *models: Tensor,
    alpha: float = 1.0,
    rank_fraction: Ratio = 0.0,
    dtype: torch.dtype,
) -> Tensor:
    """TSV-Merge (arXiv 2412.00081, Eq. 7-9): each task vector's top k singular
    triplets, k = ⌊r/T⌋ of r = min(m, n) (⌊rank_fraction·r⌋ when
    `rank_fraction` > 0; 0 stands for 1/T, the paper's), concatenated into
    U = [U₁ … U_T], S = diag(S₁ … S_T), V = [V₁ … V_T]; U and V are replaced by
    their orthogonal polar factors U⊥, V⊥ (Procrustes), and the result is
    base + alpha·U⊥·S·V⊥ᵀ. A matrix of rank r < T keeps no triplet (k = 0): the base,
    as in the authors' code. Tensors that are not matrices get base + alpha·mean(Δᵢ),
    as the authors' code. SVDs in float64."""
    import torch

    deltas = _Deltas(base, models, dtype)
    if deltas.matrix is None:
        return deltas.mean_result(alpha)
    rank, count = deltas.rank, deltas.count
    per_task = int(rank * rank_fraction) if rank_fraction > 0.0 else rank // count
    lefts, values, rights = [], [], []
    scale = 0.0
    for index in range(count):
        delta = deltas.delta(index)
        scale += delta.norm().item()
        if per_task == 0:
            continue
        u, s, vh = _svd(delta)
        del delta
        lefts.append(u[:, :per_task])
        values.append(s[:per_task])
        rights.append(vh[:per_task])
    if not values:
        m, n = deltas.matrix
        nothing = torch.zeros(m, 0, dtype=torch.float64, device=base.device)
        return deltas.result(nothing, nothing.new_zeros(0, n), alpha)
    singular = torch.cat(values)
    kept = singular > deltas.tolerance(scale)
    left = _polar(torch.cat(lefts, dim=1)[:, kept])
    right = _polar(torch.cat(rights)[kept].T).T
    return deltas.result(left * singular[kept], right, alpha)
