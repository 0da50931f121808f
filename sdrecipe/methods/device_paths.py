"""Torch-only implementations of the task-vector methods whose CPU functions run
compiled loops: TIES, DARE, DARE-TIES, breadcrumbs and breadcrumbs-TIES on any
torch device (`--device`), with the CPU function's bytes.

Each takes the CPU function's parameters and a key's whole tensors, operands
and result on one device (`base.device`), and repeats the CPU computation
operation for operation in the compute dtype: the operands converted as torch
converts them, task vectors `model - base`, DARE's drop `d * kept * scale`,
TIES' trim `d * (|d| >= threshold)`, the sign election and the disjoint mean
`total / max(weight, 1) * alpha + base` of `kernels.ties_merge`, each a torch op
of its own (no fused multiply-add), sums across models in the CPU's order.
The thresholds are the CPU's own: its samples (computed as it computes them),
brackets, integer counts and exact selections (`kthvalue`), which do not
depend on the device; for finite values, the exact order statistics. DARE's
masks are drawn on the CPU by the CPU's own `DropMask` (same seed, key, index
and calls) and moved to the device.

The bytes are the CPU function's for every input but NaNs: finite values,
infinities, signed zeros and ties at a threshold included (the tests compare
them). Where task vectors hold NaNs, the result is NaN at the same positions
and the CPU's bytes elsewhere, but a NaN's sign and payload bits may differ:
the compiled loops keep one operand's NaN, torch's ops on the CPU may keep
the other's or give another, a GPU returns its canonical NaN. SCE has no
device path (nor DELLA): its weights are numpy's pairwise float64 sums and
its selection torch's variance (whose CPU and CUDA algorithms round
differently); it runs on the CPU.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

# `sparse` and `task_vectors` register the CPU functions first: `device_path`
# replaces their entries, wherever the package imports this module.
from sdrecipe.methods import sparse as _sparse  # noqa: F401
from sdrecipe.methods.drop_masks import DropMask
from sdrecipe.methods.registry import device_path
from sdrecipe.methods.task_vectors import (
    SAMPLE_RUN,
    THRESHOLD_SAMPLE,
    pieces,
    sample_step,
    threshold_bracket,
)

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from sdrecipe.methods.task_vectors import SignRule
    from sdrecipe.recipe.per_key import KeyContext


class _Sorted:
    """A sorted 1-D tensor as `threshold_bracket` reads a sorted numpy array
    (`size`, and items with `.item()`), so that the bracket is its own code."""

    def __init__(self, values: Tensor):
        self.values = values
        self.size = values.numel()

    def __getitem__(self, index: int) -> Tensor:
        return self.values[index]


def _threshold(magnitudes: Tensor, keep: int, sample: Tensor | None = None) -> Tensor | float:
    """`task_vectors.magnitude_threshold`'s answer for the flat `magnitudes`
    (NaNs included): the `keep`-th largest, a 0-dim tensor on their device (the
    float 0 if all are kept, inf if none is). `sample` is the CPU's sample where it is not every
    `sample_step`-th magnitude (TIES': runs at a stride, computed as
    `sampled_magnitudes` computes it).

    Without NaNs, the exact `keep`-th largest, whatever the sample. With NaNs,
    as the CPU: every magnitude taken (a small tensor) or the bracket missed,
    the `keep`-th largest with NaNs above infinity (numpy's sort, torch's
    kthvalue); inside the bracket (whose count of those above leaves NaNs
    out), the `keep`-th largest of the others."""
    import torch

    numel = magnitudes.numel()
    if keep >= numel:
        return 0.0
    if keep <= 0:
        return math.inf
    rank = numel - keep + 1
    step = sample_step(numel)
    if step == 1:  # the CPU's sample is every magnitude, and its threshold from it
        source = magnitudes if sample is None else sample
        return source.kthvalue(rank).values
    nan = int(torch.isnan(magnitudes).sum())
    if nan == 0:
        return magnitudes.kthvalue(rank).values
    ordered = torch.sort(magnitudes[::step] if sample is None else sample).values
    low, high = threshold_bracket(_Sorted(ordered), numel, keep)  # type: ignore[arg-type]
    above = int((magnitudes > high).sum())
    inside = int(((magnitudes >= low) & (magnitudes <= high)).sum())
    if 0 < keep - above <= inside:
        rank -= nan  # the NaNs are the largest: the rank among the others
    return magnitudes.kthvalue(rank).values


def _stored_magnitudes(model: Tensor, base: Tensor, dtype: torch.dtype) -> Tensor:
    """|`model` - `base`| as the CPU's samples compute it (`strided_magnitudes`,
    `sampled_magnitudes`: `model.to(dtype).sub_(base)`): the model converted, the
    base as stored, the difference in their common dtype rounded to `dtype` (a
    float64 base rounds once, after the subtraction). A float8 base, which torch
    does not promote (the CPU function raises), is converted exactly first."""
    import torch

    wide = torch.float64 if torch.float64 in (dtype, base.dtype) else dtype
    return (model.to(dtype).to(wide) - base.to(wide)).to(dtype).abs()


def _ties_sample(model: Tensor, base: Tensor, dtype: torch.dtype) -> Tensor:
    """`TaskVectors.sampled_magnitudes` of the flat `model` over the flat `base`:
    every magnitude of a small tensor, else runs of `SAMPLE_RUN` at a stride."""
    numel = base.numel()
    if sample_step(numel) > 1:
        runs = THRESHOLD_SAMPLE // SAMPLE_RUN
        stride = numel // runs
        model = model[: runs * stride].view(runs, stride)[:, :SAMPLE_RUN]
        base = base[: runs * stride].view(runs, stride)[:, :SAMPLE_RUN]
    return _stored_magnitudes(model, base, dtype).reshape(-1)


def _trimmed(delta: Tensor, magnitudes: Tensor, threshold: Tensor | float) -> Tensor:
    """TIES' trim as `kernels._task_vector`: `d * (|d| >= threshold)` (a product,
    so that a NaN stays and -0 stays -0)."""
    return delta * (magnitudes >= threshold).to(delta.dtype)


def _sign(values: Tensor) -> Tensor:
    """`np.sign` as numba computes it: 1 above 0, -1 below, else the value itself
    (a zero keeps its sign, a NaN stays; torch's sign gives 0 for a NaN)."""
    import torch

    one = torch.ones((), dtype=values.dtype, device=values.device)
    return torch.where(values > 0, one, torch.where(values < 0, -one, values))


def _elected_mean(values: list[Tensor], origin: Tensor, alpha: float, count_rule: bool) -> Tensor:
    """`kernels.ties_merge` of the (trimmed) task vectors `values` with weights
    1 and floor 1: each element's sign elected by the sum of the task vectors
    (+1 where it is at or above 0, else -1, a NaN sum included) or, with
    `count_rule`, by the sum of their signs; the agreeing values' mean (0 where
    none agrees) times `alpha`, plus `origin`; one op a step, as the loop."""
    import torch

    one = torch.ones((), dtype=origin.dtype, device=origin.device)
    if count_rule:
        votes = _sign(values[0])
        for value in values[1:]:
            votes = votes + _sign(value)
        elected = _sign(votes)
    else:
        votes = values[0]
        for value in values[1:]:
            votes = votes + value
        elected = torch.where(votes >= 0, one, -one)
    del votes
    total = torch.zeros_like(origin)
    weight = torch.zeros_like(origin)
    for value in values:
        agrees = (value * elected > 0).to(origin.dtype)
        total = total + value * agrees
        weight = weight + agrees
    return total / torch.clamp_min(weight, 1.0) * alpha + origin


def _kept(drop: float, seed: int, key: str, index: int, numel: int, device: torch.device) -> Tensor:
    """DARE's keep mask of task vector `index` (`words >= cutoff`), drawn on the
    CPU by `DropMask` a piece at a time as the CPU function draws it, then moved
    to `device` as a bool tensor."""
    import torch

    mask = DropMask(drop, seed, key, index)
    cutoff = np.uint32(mask.cutoff)
    kept = np.empty(numel, np.bool_)
    for piece in pieces(numel):
        np.greater_equal(mask.words(piece.stop - piece.start), cutoff, out=kept[piece])
    return torch.from_numpy(kept).to(device, non_blocking=False)


def _dropped(delta: Tensor, kept: Tensor, scale: float) -> Tensor:
    """DARE's drop as `kernels.drop`: `d * kept * scale` (the scale in the dtype)."""
    return delta * kept.to(delta.dtype) * scale


@device_path("ties")
def ties_on_device(
    base: Tensor,
    *models: Tensor,
    density: float = 0.2,
    alpha: float = 1.0,
    sign: SignRule = "sum",
    dtype: torch.dtype,
) -> Tensor:
    """`task_vectors.ties` on `base.device`: each task vector trimmed at its
    exact threshold, then the election and disjoint mean."""
    flat = base.reshape(-1)
    origin = flat.to(dtype)
    numel = flat.numel()
    keep = int(density * numel)
    trimmed = []
    for model in models:
        stored = model.reshape(-1)
        delta = stored.to(dtype) - origin
        magnitudes = delta.abs()
        sample = _ties_sample(stored, flat, dtype) if 0 < keep < numel else None
        trimmed.append(_trimmed(delta, magnitudes, _threshold(magnitudes, keep, sample)))
        del delta, magnitudes, sample
    return _elected_mean(trimmed, origin, alpha, sign == "count").reshape(base.shape)


@device_path("dare")
def dare_on_device(
    base: Tensor,
    *models: Tensor,
    drop: float = 0.9,
    alpha: float = 1.0,
    seed: int = 0,
    rescale: bool = True,
    context: KeyContext,
    dtype: torch.dtype,
) -> Tensor:
    """`task_vectors.dare` on `base.device`: each task vector dropped by its
    mask, summed in order, times `alpha / count`, plus the base (`mean_added`)."""
    import torch

    origin = base.reshape(-1).to(dtype)
    numel = origin.numel()
    scale = 1.0 / (1.0 - drop) if rescale and drop < 1.0 else 1.0
    total: Tensor | None = None
    for index, model in enumerate(models):
        if drop >= 1.0:  # the CPU's `zero_()`: +0 everywhere, NaNs included
            delta = torch.zeros_like(origin)
        else:
            kept = _kept(drop, seed, context.key, index, numel, origin.device)
            delta = _dropped(model.reshape(-1).to(dtype) - origin, kept, scale)
            del kept
        total = delta if total is None else total + delta
    assert total is not None  # at least two models
    return (total * (alpha / len(models)) + origin).reshape(base.shape)


@device_path("dare_ties")
def dare_ties_on_device(
    base: Tensor,
    *models: Tensor,
    drop: float = 0.9,
    alpha: float = 1.0,
    seed: int = 0,
    rescale: bool = True,
    density: float = 1.0,
    sign: SignRule = "sum",
    context: KeyContext,
    dtype: torch.dtype,
) -> Tensor:
    """`task_vectors.dare_ties` on `base.device`: each task vector dropped by its
    mask, trimmed at the exact threshold of its dropped magnitudes (if
    `density` < 1), then the election and disjoint mean."""
    import torch

    origin = base.reshape(-1).to(dtype)
    if drop >= 1.0:  # every task vector is 0: the CPU's `zeros.mul_(alpha).add_(base)`
        return (torch.zeros_like(origin) * alpha + origin).reshape(base.shape)
    numel = origin.numel()
    keep = int(density * numel)
    scale = 1.0 / (1.0 - drop) if rescale else 1.0
    trimmed = []
    for index, model in enumerate(models):
        kept = _kept(drop, seed, context.key, index, numel, origin.device)
        delta = _dropped(model.reshape(-1).to(dtype) - origin, kept, scale)
        del kept
        magnitudes = delta.abs()
        threshold = _threshold(magnitudes, keep) if density < 1.0 else 0.0
        trimmed.append(_trimmed(delta, magnitudes, threshold))
        del delta, magnitudes
    return _elected_mean(trimmed, origin, alpha, sign == "count").reshape(base.shape)


def _rank_values(
    magnitudes: Tensor, model: Tensor, base: Tensor, dtype: torch.dtype, ranks: list[int]
) -> list[float]:
    """`sparse._ranked`'s threshold values: the `k`-th largest magnitude for each
    `k` of `ranks` as the CPU finds it (NaNs included). The sample is
    `strided_magnitudes` (the model converted, the base as stored); every
    magnitude taken, its `k`-th largest (NaNs above infinity); else the
    sample's bracket, the count above it (`_count_beyond`: NaNs left out) and
    the magnitudes inside it (from the least positive one where it starts at 0),
    0 where the zeros fill the rank, else `bracketed_threshold`."""
    import torch

    numel = magnitudes.numel()
    step = sample_step(numel)
    sample = _stored_magnitudes(model[::step], base[::step], dtype)
    if step == 1:
        return [sample.kthvalue(numel - k + 1).values.item() if k < numel else 0.0 for k in ranks]
    ordered = _Sorted(torch.sort(sample).values)
    nan = int(torch.isnan(magnitudes).sum())
    least = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # the least positive
    values = []
    for k in ranks:
        if k >= numel:
            values.append(0.0)
            continue
        low, high = threshold_bracket(ordered, numel, k)  # type: ignore[arg-type]
        more = int((~(magnitudes <= high)).sum()) - nan
        within = (magnitudes >= (low if low != 0 else least)) & (magnitudes <= high)
        inside = int(within.sum())
        zeros = numel - nan - more - inside if low == 0 and high == high else 0
        wanted = k - more
        if inside < wanted <= inside + zeros:
            values.append(0.0)
        elif 0 < wanted <= inside:
            values.append(magnitudes[within].kthvalue(inside - wanted + 1).values.item())
        else:
            values.append(magnitudes.kthvalue(numel - k + 1).values.item())
    return values


def _cut(magnitudes: Tensor, value: float, rank: int) -> int:
    """`sparse._cut` of the threshold `value`: the flat position from which the
    entries of magnitude `value` have ranks from `rank` up, counted in flat
    order after the smaller ones (0 if all do, the size if none does; for 0,
    whose ties make no difference, none are counted: `sparse._exact`)."""
    import torch

    numel = magnitudes.numel()
    below = int((magnitudes < value).sum()) if value != 0 else 0
    ordinal = rank - below
    if ordinal <= 0:
        return 0
    if value == 0:
        return numel
    equal = torch.nonzero(magnitudes == value).reshape(-1)
    return int(equal[ordinal]) if ordinal < equal.numel() else numel


def _outliers(model: Tensor, base: Tensor, origin: Tensor, density: float, gamma: float) -> Tensor:
    """Breadcrumbs' trim of the flat task vector `model - base` (`sparse._Outliers`
    and `outlier_kernels._trimmed`): of its n entries ranked by magnitude
    ascending, those of ranks [b, b + int(density·n)) kept, b = max(0, n -
    int(density·n) - int(gamma·n)), as the CPU takes them: its two thresholds
    (`_rank_values`), above the low one and below the high one kept, and of
    those equal to one, the ones at flat positions between its cuts; `d * kept`,
    `d` itself if all are kept, +0 if none."""
    import torch

    delta = model.to(origin.dtype) - origin
    numel = delta.numel()
    target = int(density * numel)
    bottom = max(0, numel - target - int(gamma * numel))
    stop = bottom + target
    if target >= numel:
        return delta
    if target <= 0:
        return torch.zeros_like(delta)
    bounded = stop < numel  # the largest are dropped too
    ranks = [numel - bottom] + ([numel - stop + 1] if bounded else [])
    magnitudes = delta.abs()
    low, high = (*_rank_values(magnitudes, model, base, origin.dtype, ranks), math.inf)[:2]
    kept = magnitudes > low
    if bounded:
        kept &= magnitudes < high
    first, last = _cut(magnitudes, low, bottom), _cut(magnitudes, low, stop)
    kept[first:last] |= magnitudes[first:last] == low
    if bounded and high != low:
        last = _cut(magnitudes, high, stop)
        kept[:last] |= magnitudes[:last] == high
    del magnitudes
    return delta * kept.to(delta.dtype)


@device_path("breadcrumbs")
def breadcrumbs_on_device(
    base: Tensor,
    *models: Tensor,
    density: float = 0.9,
    gamma: float = 0.01,
    alpha: float = 1.0,
    dtype: torch.dtype,
) -> Tensor:
    """`sparse.breadcrumbs` on `base.device`: the trimmed task vectors summed in
    order, times `alpha / count`, plus the base (`outlier_kernels.outliers_mean`)."""
    flat = base.reshape(-1)
    origin = flat.to(dtype)
    total: Tensor | None = None
    for model in models:
        trimmed = _outliers(model.reshape(-1), flat, origin, density, gamma)
        total = trimmed if total is None else total + trimmed
    assert total is not None  # at least two models
    return (total * (alpha / len(models)) + origin).reshape(base.shape)


@device_path("breadcrumbs_ties")
def breadcrumbs_ties_on_device(
    base: Tensor,
    *models: Tensor,
    density: float = 0.9,
    gamma: float = 0.01,
    alpha: float = 1.0,
    sign: SignRule = "sum",
    dtype: torch.dtype,
) -> Tensor:
    """`sparse.breadcrumbs_ties` on `base.device`: the trimmed task vectors, then
    the election and disjoint mean (`outlier_kernels.outliers_ties`: a trim at
    0, which keeps every value, then `ties_merge`)."""
    flat = base.reshape(-1)
    origin = flat.to(dtype)
    trimmed = []
    for model in models:
        delta = _outliers(model.reshape(-1), flat, origin, density, gamma)
        trimmed.append(_trimmed(delta, delta.abs(), 0.0))
        del delta
    return _elected_mean(trimmed, origin, alpha, sign == "count").reshape(base.shape)
