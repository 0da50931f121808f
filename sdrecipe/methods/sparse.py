"""Sparsifying task-vector methods: Model Breadcrumbs, DELLA and SCE.

As TIES and DARE (task_vectors.py), each needs a key's whole tensor yet holds
only its result in the compute dtype: the task vectors are recomputed from the
operands as stored, a piece at a time, for every pass (a threshold, a count,
the result).

Where a trim ranks entries (breadcrumbs by magnitude, SCE by variance), equal
values are ranked by flat index, so that it keeps exactly the count it names:
mergekit's choice with a stable sort, whatever the data.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from sdrecipe.methods.buffers import result_tensor
from sdrecipe.methods.classic import Ratio
from sdrecipe.methods.drop_masks import DropMask
from sdrecipe.methods.registry import merge_method
from sdrecipe.methods.task_vectors import (
    PIECE_ELEMENTS,
    Magnitudes,
    SignRule,
    TaskVectors,
    bracketed_threshold,
    kernel_array,
    magnitude_threshold,
    mean_added,
    pieces,
    sample_step,
    threshold_bracket,
    ties_merge,
)

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from sdrecipe.recipe.per_key import KeyContext


class _Ties:
    """Of the entries equal to `value`, counted in flat-index order over pieces
    given in order, those from the `first`-th to before the `stop`-th."""

    def __init__(self, value: float, first: int, stop: int):
        self.value, self.first, self.stop = value, first, stop
        self.seen = 0

    def select(self, values: np.ndarray) -> np.ndarray | None:
        """The chosen entries of the next piece (None: none)."""
        equal = values == self.value
        count = int(np.count_nonzero(equal))
        start, self.seen = self.seen, self.seen + count
        if count == 0 or start >= self.stop or start + count <= self.first:
            return None
        if self.first <= start and start + count <= self.stop:
            return equal
        ordinal = np.cumsum(equal) + (start - 1)
        return equal & (ordinal >= self.first) & (ordinal < self.stop)


def _magnitudes(vectors: TaskVectors, index: int) -> Magnitudes:
    """|task vector `index`|, piece by piece, each time it is called."""

    def run() -> Iterator[tuple[slice, Tensor]]:
        for piece in pieces(vectors.numel):
            yield piece, vectors.delta(index, piece, vectors.base_piece(piece)).abs_()

    return run


class _Ranked(NamedTuple):
    """A magnitude threshold of a task vector, how many of its magnitudes are
    below it, and the flat positions of those equal to it, in order."""

    value: float
    below: int
    equal: np.ndarray


def _ranked(vectors: TaskVectors, index: int, ranks: list[int]) -> list[_Ranked]:
    """The `k`-th largest magnitude of task vector `index` for each `k` of
    `ranks` (`magnitude_threshold`'s; 0 for k = all): one compiled pass
    counts and gathers inside the bracket of each (at most two), which the
    sample gives; a threshold outside its bracket takes a pass of its own."""
    numel = vectors.numel
    magnitudes = _magnitudes(vectors, index)
    step = sample_step(numel)
    ordered = np.sort(vectors.strided_magnitudes(index, step).numpy())
    if step == 1:  # the sample is every magnitude
        return [_exact(magnitudes, ordered[numel - k].item() if k < numel else 0.0) for k in ranks]
    brackets = [threshold_bracket(ordered, numel, k) if k < numel else (0.0, 0.0) for k in ranks]
    above, nan, values, positions = _gathered(vectors, index, brackets)
    ranked = []
    for k, (low, high), more in zip(ranks, brackets, above, strict=True):
        # Indices, not a boolean mask: numpy takes by them in a quarter of the time.
        within = np.flatnonzero((values >= low) & (values <= high))
        inside = values[within]
        # The zeros of a bracket from 0, counted rather than gathered.
        zeros = numel - nan - more - inside.size if low == 0 and high == high else 0
        if k >= numel or inside.size < k - more <= inside.size + zeros:
            value = 0.0
        else:
            value = bracketed_threshold(magnitudes, k, more, inside)
        if value == 0 or not low <= value <= high:
            ranked.append(_exact(magnitudes, value))
            continue
        below = numel - nan - more - inside.size + int(np.count_nonzero(inside < value))
        ranked.append(_Ranked(value, below, positions[within[inside == value]]))
    return ranked


def _gathered(
    vectors: TaskVectors, index: int, brackets: list[tuple[float, float]]
) -> tuple[list[int], int, np.ndarray, np.ndarray]:
    """One pass of `kernels.count_and_gather_brackets` over task vector
    `index`: how many magnitudes are above each bracket, how many are NaN, and
    those inside any bracket with their flat positions, in order."""
    import torch

    from sdrecipe.methods.outlier_kernels import count_and_gather_brackets

    size = min(vectors.numel, PIECE_ELEMENTS)
    magnitudes = torch.empty(size, dtype=vectors.dtype).numpy()
    flags = np.empty(size, np.uint8)
    # A second bracket, if none is given, holds nothing; none holds 0 (`_exact`).
    bounds = np.array([*brackets, (math.inf, -math.inf)][:2], magnitudes.dtype)
    scalar = magnitudes.dtype.type
    bounds[bounds[:, 0] == 0, 0] = np.nextafter(scalar(0), scalar(1))
    counts = np.zeros(3, np.int64)
    values, positions = np.empty(2 * size, magnitudes.dtype), np.empty(2 * size, np.int64)
    found = 0
    for piece in pieces(vectors.numel):
        if found + size > values.size:  # room for all of the piece
            values, positions = (
                np.concatenate([a[:found], np.empty_like(a)]) for a in (values, positions)
            )
        model = kernel_array(vectors.models[index][piece], vectors.dtype)
        base = vectors.kernel_base(piece)
        scratch = (magnitudes, flags, values[found:], positions[found:])
        found += count_and_gather_brackets(model, base, piece.start, bounds, counts, *scratch)
    return counts[: len(brackets)].tolist(), int(counts[2]), values[:found], positions[:found]


def _exact(magnitudes: Magnitudes, value: float) -> _Ranked:
    """`value` ranked by a pass over all `magnitudes()`; for 0, no pass: none
    is below it, and which entries of magnitude 0 a trim keeps makes no
    difference (0 times 1 or 0 is that 0), so their positions are not needed."""
    if value == 0:
        return _Ranked(0.0, 0, np.empty(0, np.int64))
    below, equal = 0, []
    for piece, magnitude in magnitudes():
        array = magnitude.numpy()
        below += int(np.count_nonzero(array < value))
        equal.append(np.flatnonzero(array == value) + piece.start)
    return _Ranked(value, below, np.concatenate(equal))


def _cut(threshold: _Ranked, rank: int, numel: int) -> int:
    """The flat position from which the entries of magnitude `threshold.value`
    (ranked in flat order after the `threshold.below` smaller ones) have ranks
    from `rank` up: 0 if all do, `numel` if none does."""
    ordinal = rank - threshold.below
    if ordinal <= 0:
        return 0
    return int(threshold.equal[ordinal]) if ordinal < threshold.equal.size else numel


class _Outliers:
    """Breadcrumbs' trim of one task vector, mergekit's `magnitude_outliers`: of
    its n entries ranked by magnitude ascending (equal magnitudes by flat index),
    keep ranks [b, b + int(density·n)), b = max(0, n - int(density·n) - int(gamma·n)):
    the largest int(gamma·n) go (fewer, if density needs them) and the smallest.
    As `kernels._trimmed` takes it: a mode, the magnitudes of the first and
    last rank kept (`limits`), and the flat positions between which the
    entries of those magnitudes are kept (`cuts`)."""

    def __init__(self, vectors: TaskVectors, index: int, density: float, gamma: float):
        from sdrecipe.methods.outlier_kernels import KEEP, TRIM, TRIM_LOW, ZERO

        numel = vectors.numel
        target = int(density * numel)
        bottom = max(0, numel - target - int(gamma * numel))
        stop = bottom + target
        self.limits, self.cuts = (0.0, math.inf), (0, 0, 0, 0)
        if target >= numel or target <= 0:
            self.mode = KEEP if target >= numel else ZERO
            return
        self.mode = TRIM if stop < numel else TRIM_LOW
        # Ranks `bottom` and (if any above are dropped) `stop - 1`, counted from the top.
        ranks = [numel - bottom] + ([numel - stop + 1] if stop < numel else [])
        low, *high = _ranked(vectors, index, ranks)
        self.limits = (low.value, high[0].value if high else math.inf)
        # The ties at a threshold of both: kept by rank, as those at the low one.
        tied = bool(high) and high[0].value != low.value
        self.cuts = (
            *(_cut(low, bottom, numel), _cut(low, stop, numel)),
            *((0, _cut(high[0], stop, numel)) if tied else (0, 0)),
        )


def _trims(vectors: TaskVectors, density: float, gamma: float) -> tuple[np.ndarray, ...]:
    """Each task vector's breadcrumbs trim as the compiled loops take them: its
    limits, mode and cuts, a row of each per task vector."""
    trims = [_Outliers(vectors, i, density, gamma) for i in range(len(vectors.models))]
    return (
        np.array([trim.limits for trim in trims], vectors.scalar),
        np.array([trim.mode for trim in trims], np.int64),
        np.array([trim.cuts for trim in trims], np.int64),
    )


@merge_method(elementwise=False, min_models=2, compiled=True)
def breadcrumbs(
    base: Tensor,
    *models: Tensor,
    density: Ratio = 0.9,
    gamma: Ratio = 0.01,
    alpha: float = 1.0,
    dtype: torch.dtype,
) -> Tensor:
    """Model Breadcrumbs (arXiv 2312.06795): each task vector drops its largest
    `gamma` fraction of magnitudes and then its smallest, keeping a `density`
    fraction (mergekit's magnitude_outliers); `base + alpha·mean` of them."""
    from sdrecipe.methods.outlier_kernels import outliers_mean

    vectors = TaskVectors(base, models, dtype)
    # `mean_added`'s factor, converted to the dtype as torch converts it.
    scale = vectors.scalar(alpha / len(models))
    return _trimmed_merge(vectors, density, gamma, outliers_mean, scale)


@merge_method(elementwise=False, min_models=2, compiled=True)
def breadcrumbs_ties(
    base: Tensor,
    *models: Tensor,
    density: Ratio = 0.9,
    gamma: Ratio = 0.01,
    alpha: float = 1.0,
    sign: SignRule = "sum",
    dtype: torch.dtype,
) -> Tensor:
    """Breadcrumbs' trim, then TIES' sign election and disjoint mean, added
    `alpha` times to the base (mergekit's breadcrumbs_ties)."""
    from sdrecipe.methods.outlier_kernels import outliers_ties

    vectors = TaskVectors(base, models, dtype)
    parameters = (sign == "count", vectors.scalar(alpha))
    return _trimmed_merge(vectors, density, gamma, outliers_ties, *parameters)


def _trimmed_merge(
    vectors: TaskVectors, density: float, gamma: float, kernel: Callable[..., None], *parameters
) -> Tensor:
    """`kernel(models, base, offset, *trims, *parameters, out)` on each piece:
    breadcrumbs' trims merged by one of `outlier_kernels`' loops."""
    trims = _trims(vectors, density, gamma)
    out = result_tensor(vectors.numel, vectors.dtype)
    flat = out.numpy()
    for piece in pieces(vectors.numel):
        models, base = vectors.kernel_models(piece), vectors.kernel_base(piece)
        kernel(models, base, piece.start, *trims, *parameters, flat[piece])
    return out.reshape(vectors.shape)


# --- DELLA -----------------------------------------------------------------------------


class _Words:
    """The 32-bit words of DARE's stream for (seed, key, model index), in order:
    word i decides element i however the elements come in pieces."""

    def __init__(self, seed: int, key: str, index: int):
        self.stream = DropMask(0.0, seed, key, index)
        self.pending = np.empty(0, dtype="<u4")  # the high half of the last output, unused

    def take(self, count: int) -> np.ndarray:
        needed = max(0, count - self.pending.size)
        fresh = self.stream.raw((needed + 1) // 2).astype("<u8", copy=False)
        words = np.concatenate([self.pending, fresh.view("<u4")])
        self.pending = words[count:]
        return words[:count]


def _row_slices(numel: int, width: int) -> Iterator[slice]:
    """Flat ranges of whole rows of `width` elements, about `PIECE_ELEMENTS` each."""
    step = max(1, PIECE_ELEMENTS // width) * width
    for start in range(0, numel, step):
        yield slice(start, min(numel, start + step))


def _ascending_ranks(values: np.ndarray) -> np.ndarray:
    """Each entry's rank in its row from the smallest magnitude up, equal
    magnitudes by position: a stable argsort's inverse, for float32 a compiled
    radix sort of the magnitudes' bits (which order as non-negative floats do)."""
    ranks = np.empty(values.shape, np.intp)
    if values.dtype == np.float32:
        from sdrecipe.methods.kernels import ascending_ranks

        ascending_ranks(np.ascontiguousarray(values), ranks)
    else:
        order = np.argsort(np.abs(values), axis=1, kind="stable")
        np.put_along_axis(ranks, order, np.arange(values.shape[1])[None, :], axis=1)
    return ranks


def _magprune(
    vectors: TaskVectors, drop: float, epsilon: float, seed: int, rescale: bool, key: str
) -> Callable[[int], Callable[[Tensor], Tensor]]:
    """For task vector `index`, a function sparsifying its pieces (whole rows of
    `_della_width`, in order, once each) in place: each entry is dropped with its
    probability q (`kernels.magprune`), the others scaled by 1/(1 - q) if
    `rescale`. Entry i is kept when word i of DARE's stream for (seed, key,
    index) is at least round(q·2³²): with `epsilon` 0, DARE's own mask."""
    from sdrecipe.methods.kernels import magprune

    width = _della_width(vectors.shape)

    def for_model(index: int) -> Callable[[Tensor], Tensor]:
        words = _Words(seed, key, index)

        def sparsify(delta: Tensor) -> Tensor:
            if drop <= 0.0:  # mergekit: density 1 keeps the task vector as it is
                return delta
            if drop >= 1.0:
                return delta.zero_()
            values = delta.numpy().reshape(-1, width)
            chosen = words.take(values.size).reshape(values.shape)
            magprune(values, _ascending_ranks(values), chosen, drop, epsilon, rescale)
            return delta

        return sparsify

    return for_model


def _della_width(shape: torch.Size) -> int:
    """The length of DELLA's rows: dim 0's rows, flattened; a 1-D tensor is one
    row (at least 1: an empty tensor has no rows to rank)."""
    numel = int(np.prod(shape, dtype=np.int64))
    return max(1, numel // shape[0] if len(shape) > 1 and shape[0] > 0 else numel)


def _della(
    base: Tensor,
    models: tuple[Tensor, ...],
    merge: Callable[[list[Tensor], Tensor], Tensor],
    drop: float,
    epsilon: float,
    seed: int,
    rescale: bool,
    key: str,
    dtype: torch.dtype,
) -> Tensor:
    """`merge(sparsified task vectors, base piece)` on each piece of whole rows."""

    vectors = TaskVectors(base, models, dtype)
    prune = _magprune(vectors, drop, epsilon, seed, rescale, key)
    sparsifiers = [prune(i) for i in range(len(models))]
    out = result_tensor(vectors.numel, dtype)
    for piece in _row_slices(vectors.numel, _della_width(vectors.shape)):
        base_piece = vectors.base_piece(piece)
        deltas = [
            sparsify(vectors.delta(i, piece, base_piece)) for i, sparsify in enumerate(sparsifiers)
        ]
        out[piece] = merge(deltas, base_piece)
    return out.reshape(vectors.shape)


@merge_method(elementwise=False, min_models=2, compiled=True)
def della(
    base: Tensor,
    *models: Tensor,
    drop: Ratio = 0.3,
    epsilon: Ratio = 0.1,
    alpha: float = 1.0,
    seed: int = 0,
    rescale: bool = True,
    context: KeyContext,
    dtype: torch.dtype,
) -> Tensor:
    """DELLA (arXiv 2406.11617), MagPrune then the mean: each task-vector entry
    is dropped with a probability from `drop + epsilon` (the smallest magnitude
    of its row) to `drop - epsilon` (the largest), the rest scaled by
    1/(1 - probability) if `rescale`; `base + alpha·mean` (mergekit's della_linear)."""
    mean = functools.partial(mean_added, alpha=alpha)
    return _della(base, models, mean, drop, epsilon, seed, rescale, context.key, dtype)


@merge_method(elementwise=False, min_models=2, compiled=True)
def della_ties(
    base: Tensor,
    *models: Tensor,
    drop: Ratio = 0.3,
    epsilon: Ratio = 0.1,
    alpha: float = 1.0,
    seed: int = 0,
    rescale: bool = True,
    sign: SignRule = "sum",
    context: KeyContext,
    dtype: torch.dtype,
) -> Tensor:
    """DELLA's MagPrune as `della`, then TIES' sign election and disjoint mean,
    added `alpha` times to the base (mergekit's della)."""
    elect = functools.partial(ties_merge, alpha=alpha, rule=sign)
    return _della(base, models, elect, drop, epsilon, seed, rescale, context.key, dtype)


# --- SCE -------------------------------------------------------------------------------


class _TopVariance:
    """SCE's selection, mergekit's `sce_mask`: the k entries of largest variance
    across the task vectors (equal variances by flat index), k =
    int(nonzero·select_topk) in float32 as mergekit computes it, nonzero the
    count of variances that are not 0."""

    def __init__(self, vectors: TaskVectors, select_topk: float):
        import torch

        self.vectors = vectors
        numel = vectors.numel
        step = sample_step(numel)
        nonzero, sample = 0, []
        for piece, variance in self.variances():
            nonzero += int(torch.count_nonzero(variance))
            sample.append(variance[(-piece.start) % step :: step])
        self.keep = int(torch.tensor(nonzero) * select_topk)
        if self.keep <= 0:
            return
        self.value = magnitude_threshold(self.variances, numel, self.keep, torch.cat(sample))
        self.above = 0
        for _, variance in self.variances():
            self.above += int(np.count_nonzero(variance.numpy() > self.value))

    def deltas(self, piece: slice, base_piece: Tensor) -> list[Tensor]:
        return [self.vectors.delta(i, piece, base_piece) for i in range(len(self.vectors.models))]

    def variances(self) -> Iterator[tuple[slice, Tensor]]:
        """The population variance across the task vectors, piece by piece."""
        import torch

        for piece in pieces(self.vectors.numel):
            deltas = self.deltas(piece, self.vectors.base_piece(piece))
            yield piece, torch.var(torch.stack(deltas), dim=0, unbiased=False)

    def producer(self) -> Callable[[slice, Tensor], list[Tensor]]:
        """The selected task vectors, for pieces in order, once each."""
        import torch

        tied = _Ties(self.value, 0, self.keep - self.above) if self.keep > 0 else None

        def selected(piece: slice, base_piece: Tensor) -> list[Tensor]:
            deltas = self.deltas(piece, base_piece)
            if tied is None:
                return [delta.zero_() for delta in deltas]
            variance = torch.var(torch.stack(deltas), dim=0, unbiased=False).numpy()
            keep = variance > self.value
            chosen = tied.select(variance)
            if chosen is not None:
                keep |= chosen
            for delta in deltas:
                np.multiply(delta.numpy(), keep, out=delta.numpy())
            return deltas

        return selected


@merge_method(elementwise=False, min_models=2, compiled=True)
def sce(
    base: Tensor,
    *models: Tensor,
    select_topk: Ratio = 1.0,
    alpha: float = 1.0,
    dtype: torch.dtype,
) -> Tensor:
    """SCE (arXiv 2408.07990), mergekit's computation: keep the `select_topk`
    fraction of entries that vary most across the task vectors, weight each task
    vector by its mean square (normalised), erase the entries against the sign
    of their sum, take the weighted mean of the rest; `base + alpha·that`."""
    vectors = TaskVectors(base, models, dtype)
    count = len(models)
    if select_topk >= 1.0:  # every entry: compiled loops on the operands as stored
        weights = _sce_weights(vectors.square_sums(), vectors.numel)
        return vectors.merged_ties(alpha, "sum", weights=(weights, 1e-6))
    selection = _TopVariance(vectors, select_topk)
    squares = np.zeros(count)
    produce = selection.producer()
    for piece in pieces(vectors.numel):
        for i, delta in enumerate(produce(piece, vectors.base_piece(piece))):
            squares[i] += np.square(delta.numpy(), dtype=np.float64).sum()
    weights = _sce_weights(squares, vectors.numel)
    produce = selection.producer()

    def combine(base_piece: Tensor, piece: slice) -> Tensor:
        return ties_merge(produce(piece, base_piece), base_piece, alpha, "sum", (weights, 1e-6))

    return vectors.result(combine)


def _sce_weights(squares: np.ndarray, numel: int) -> list[float]:
    """mergekit's sce_weight: each task vector's mean square over their sum, equal
    weights where the mean squares sum to under 1e-6."""
    means = squares / max(1, numel)
    total = means.sum()
    count = len(squares)
    return [1.0 / count] * count if abs(total) < 1e-6 else list(means / total)
