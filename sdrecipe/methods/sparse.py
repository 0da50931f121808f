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
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from sdrecipe.methods.classic import Ratio
from sdrecipe.methods.registry import merge_method
from sdrecipe.methods.task_vectors import (
    PIECE_ELEMENTS,
    DropMask,
    SignRule,
    TaskVectors,
    magnitude_threshold,
    mean_added,
    pieces,
    sample_step,
    ties_merge,
)

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from sdrecipe.recipe.per_key import KeyContext

# A function of (piece, base piece) giving a task vector's sparsified form on the piece.
Producer = Callable[[slice, "Tensor"], "Tensor"]
Values = Callable[[], Iterator[tuple[slice, "Tensor"]]]


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


def _magnitudes(vectors: TaskVectors, index: int) -> Values:
    """|task vector `index`|, piece by piece, each time it is called."""

    def run() -> Iterator[tuple[slice, Tensor]]:
        for piece in pieces(vectors.numel):
            yield piece, vectors.delta(index, piece, vectors.base_piece(piece)).abs_()

    return run


def _count_below(values: Values, thresholds: list[float]) -> list[int]:
    """How many values are below each threshold (one pass)."""
    counts = [0] * len(thresholds)
    for _, piece in values():
        array = piece.numpy()
        for i, threshold in enumerate(thresholds):
            counts[i] += int(np.count_nonzero(array < threshold))
    return counts


class _Outliers:
    """Breadcrumbs' trim of one task vector, mergekit's `magnitude_outliers`: of
    its n entries ranked by magnitude ascending (equal magnitudes by flat index),
    keep ranks [b, b + int(density·n)), b = max(0, n - int(density·n) - int(gamma·n)):
    the largest int(gamma·n) go (fewer, if density needs them) and the smallest."""

    def __init__(self, vectors: TaskVectors, index: int, density: float, gamma: float):
        self.vectors, self.index = vectors, index
        numel = vectors.numel
        target = int(density * numel)
        self.bottom = max(0, numel - target - int(gamma * numel))
        self.stop = self.bottom + target
        self.everything, self.nothing = target >= numel, target <= 0
        if self.everything or self.nothing:
            return
        magnitudes = _magnitudes(vectors, index)
        sample = vectors.strided_magnitudes(index, sample_step(numel))
        # The magnitudes of ranks `bottom` and `stop - 1` (0 for rank 0; None: none
        # above is dropped), and how many magnitudes are below each.
        count = functools.partial(vectors.magnitude_count, index)
        self.low = magnitude_threshold(magnitudes, numel, numel - self.bottom, sample, count)
        self.high = (
            magnitude_threshold(magnitudes, numel, numel - self.stop + 1, sample, count)
            if self.stop < numel
            else None
        )
        wanted = [t for t in (self.low, self.high) if t is not None and t > 0]
        below = dict(zip(wanted, _count_below(magnitudes, wanted), strict=True))
        self.below_low = below.get(self.low, 0)
        self.below_high = below.get(self.high, 0) if self.high is not None else 0

    def producer(self) -> Producer:
        """The trimmed task vector, for pieces in order, once each."""
        vectors, index = self.vectors, self.index
        if self.everything or self.nothing:
            everything = self.everything

            def whole(piece: slice, base_piece: Tensor) -> Tensor:
                delta = vectors.delta(index, piece, base_piece)
                return delta if everything else delta.zero_()

            return whole
        low, high = self.low, self.high
        ties = [_Ties(low, self.bottom - self.below_low, self.stop - self.below_low)]
        if high is not None and high != low:
            ties.append(_Ties(high, 0, self.stop - self.below_high))

        def trimmed(piece: slice, base_piece: Tensor) -> Tensor:
            delta = vectors.delta(index, piece, base_piece)
            values = delta.numpy()
            magnitudes = np.abs(values)
            keep = magnitudes > low
            if high is not None:
                keep &= magnitudes < high
            for tied in ties:
                chosen = tied.select(magnitudes)
                if chosen is not None:
                    keep |= chosen
            np.multiply(values, keep, out=values)
            return delta

        return trimmed


def _outlier_trims(
    vectors: TaskVectors, density: float, gamma: float
) -> Callable[[], list[Producer]]:
    """A function giving, for a pass, each task vector's breadcrumbs trim."""
    trims = [_Outliers(vectors, i, density, gamma) for i in range(len(vectors.models))]
    return lambda: [trim.producer() for trim in trims]


@merge_method(elementwise=False, min_models=2)
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
    vectors = TaskVectors(base, models, dtype)
    producers = _outlier_trims(vectors, density, gamma)()
    return vectors.merged(producers, functools.partial(mean_added, alpha=alpha))


@merge_method(elementwise=False, min_models=2)
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
    vectors = TaskVectors(base, models, dtype)
    producers = _outlier_trims(vectors, density, gamma)()
    return vectors.merged(producers, functools.partial(ties_merge, alpha=alpha, rule=sign))


# --- DELLA -----------------------------------------------------------------------------


class _Words:
    """The 32-bit words of DARE's stream for (seed, key, model index), in order:
    word i decides element i however the elements come in pieces."""

    def __init__(self, seed: int, key: str, index: int):
        self.generator = DropMask(0.0, seed, key, index).generator
        self.pending = np.empty(0, dtype="<u4")  # the high half of the last output, unused

    def take(self, count: int) -> np.ndarray:
        needed = max(0, count - self.pending.size)
        fresh = self.generator.random_raw((needed + 1) // 2).astype("<u8", copy=False)
        words = np.concatenate([self.pending, fresh.view("<u4")])
        self.pending = words[count:]
        return words[:count]


def _row_slices(numel: int, width: int) -> Iterator[slice]:
    """Flat ranges of whole rows of `width` elements, about `PIECE_ELEMENTS` each."""
    step = max(1, PIECE_ELEMENTS // width) * width
    for start in range(0, numel, step):
        yield slice(start, min(numel, start + step))


def _ascending_order(magnitudes: np.ndarray) -> np.ndarray:
    """Each row's positions from the smallest magnitude up, equal magnitudes by
    position. For float32, one sort of (magnitude bits, position) keys: numpy
    sorts integers with SIMD, three times as fast as a stable argsort (the
    bits of non-negative floats order as the floats; NaNs are made one value,
    as argsort holds them equal)."""
    if magnitudes.dtype != np.float32:
        return np.argsort(magnitudes, axis=1, kind="stable")
    width = magnitudes.shape[1]
    bits = np.minimum(magnitudes.view(np.uint32), np.uint32(0x7F800001)).astype(np.uint64)
    keys = (bits << np.uint64(32)) | np.arange(width, dtype=np.uint64)
    keys.sort(axis=1)
    return (keys & np.uint64(0xFFFFFFFF)).astype(np.intp)


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
            order = _ascending_order(np.abs(values))
            chosen = words.take(values.size).reshape(values.shape)
            magprune(values, order, chosen, drop, epsilon, rescale)
            return delta

        return sparsify

    return for_model


def _della_width(shape: torch.Size) -> int:
    """The length of DELLA's rows: dim 0's rows, flattened; a 1-D tensor is one row."""
    numel = int(np.prod(shape, dtype=np.int64))
    return numel // shape[0] if len(shape) > 1 and shape[0] > 0 else max(1, numel)


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
    import torch

    vectors = TaskVectors(base, models, dtype)
    prune = _magprune(vectors, drop, epsilon, seed, rescale, key)
    sparsifiers = [prune(i) for i in range(len(models))]
    out = torch.empty(vectors.numel, dtype=dtype)
    for piece in _row_slices(vectors.numel, _della_width(vectors.shape)):
        base_piece = vectors.base_piece(piece)
        deltas = [
            sparsify(vectors.delta(i, piece, base_piece)) for i, sparsify in enumerate(sparsifiers)
        ]
        out[piece] = merge(deltas, base_piece)
    return out.reshape(vectors.shape)


@merge_method(elementwise=False, min_models=2)
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


@merge_method(elementwise=False, min_models=2)
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


@merge_method(elementwise=False, min_models=2)
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
    if select_topk < 1.0:
        producer = _TopVariance(vectors, select_topk).producer
    else:

        def producer() -> Callable[[slice, Tensor], list[Tensor]]:
            def whole(piece: slice, base_piece: Tensor) -> list[Tensor]:
                return [vectors.delta(i, piece, base_piece) for i in range(count)]

            return whole

    squares = np.zeros(count)
    produce = producer()
    for piece in pieces(vectors.numel):
        for i, delta in enumerate(produce(piece, vectors.base_piece(piece))):
            squares[i] += np.square(delta.numpy(), dtype=np.float64).sum()
    means = squares / max(1, vectors.numel)
    # mergekit's sce_weight: equal weights where the mean squares sum to under 1e-6.
    total = means.sum()
    weights = np.full(count, 1.0 / count) if abs(total) < 1e-6 else means / total
    produce = producer()

    def combine(base_piece: Tensor, piece: slice) -> Tensor:
        import torch

        values = [delta.numpy() for delta in produce(piece, base_piece)]
        votes = values[0].copy()
        for value in values[1:]:
            votes += value
        elected = np.where(votes >= 0, 1.0, -1.0).astype(votes.dtype)
        weighted = np.zeros_like(votes)
        weight = np.zeros_like(votes)
        for value, factor in zip(values, weights.astype(votes.dtype), strict=True):
            erased = np.multiply(value * elected > 0, factor, dtype=votes.dtype)
            weighted += value * erased
            weight += erased
        merged = np.divide(weighted, np.maximum(weight, 1e-6, out=weight), out=weighted)
        return torch.from_numpy(merged).mul_(alpha).add_(base_piece)

    return vectors.result(combine)
