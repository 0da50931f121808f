"""Task-vector methods: TIES, DARE, DARE-TIES, model stock and the geometric median.

A model's task vector is its difference from the base. These methods need a
key's whole tensor (a magnitude threshold, a mask seeded per key, angles
between task vectors) yet hold only the result in the compute dtype: the
operands stay as stored and are converted `PIECE_ELEMENTS` at a time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
from pydantic import Field

from sdrecipe.methods.buffers import result_tensor
from sdrecipe.methods.classic import Ratio
from sdrecipe.methods.drop_masks import DropMask
from sdrecipe.methods.registry import merge_method

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from sdrecipe.recipe.per_key import KeyContext

Positive = Annotated[float, Field(gt=0.0)]
SignRule = Literal["sum", "count"]
# Magnitudes piece by piece, in order, each time it is called.
Magnitudes = Callable[[], Iterator[tuple[slice, "Tensor"]]]

# 1 MiB of float32 a piece, as the executor's row ranges: temporaries stay in the L2
# cache (measured on a 14.7 M-element key: 0.40 s per TIES of three models, 1.0 s at 4 MiB).
PIECE_ELEMENTS = 1 << 18
# Magnitudes sampled (at a fixed stride) to bracket a top-k threshold before the exact pass.
THRESHOLD_SAMPLE = 1 << 16
# ... taken in runs of this many consecutive elements: one strided element a cache
# line made the sample a cache miss per value (1 ms a model of a 13 M-element key;
# 0.17 ms in runs).
SAMPLE_RUN = 16


def pieces(numel: int) -> Iterator[slice]:
    """Consecutive ranges of at most `PIECE_ELEMENTS` flat elements."""
    for start in range(0, numel, PIECE_ELEMENTS):
        yield slice(start, min(numel, start + PIECE_ELEMENTS))


# The DARE words of a model that is not dropped.
NO_WORDS = np.empty(0, dtype=np.uint32)


def viewable(tensor: Tensor) -> bool:
    """Whether the compiled loops read `tensor` as stored (`kernel_array` converts none)."""
    import torch

    return tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def kernel_array(tensor: Tensor, dtype: torch.dtype) -> np.ndarray:
    """A flat tensor as the compiled loops read it: float16 and bfloat16 as their
    bits (uint16 and int16), float32 and float64 as they are, any other
    dtype converted to `dtype`."""
    import torch

    if tensor.dtype == torch.float16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.to(dtype)
    return tensor.numpy()


class TaskVectors:
    """The task vectors of `models` over `base`, produced a piece at a time in `dtype`."""

    def __init__(self, base: Tensor, models: tuple[Tensor, ...], dtype: torch.dtype):
        self.shape = base.shape
        self.base = base.reshape(-1)
        self.models = [model.reshape(-1) for model in models]
        self.dtype = dtype
        self.numel = self.base.numel()

    @functools.cached_property
    def scalar(self) -> type[np.floating]:
        """numpy's scalar type of the compute dtype."""
        import torch

        return torch.empty(0, dtype=self.dtype).numpy().dtype.type

    def base_piece(self, piece: slice) -> Tensor:
        """The base on `piece`; possibly the operand itself, so read only."""
        return self.base[piece].to(self.dtype)

    def delta(self, index: int, piece: slice, base_piece: Tensor) -> Tensor:
        """Task vector `index` on `piece` (a new tensor)."""
        return self.models[index][piece].to(self.dtype, copy=True).sub_(base_piece)

    def strided_magnitudes(self, index: int, step: int) -> Tensor:
        """|task vector `index`| at every `step`-th element."""
        return self.models[index][::step].to(self.dtype, copy=True).sub_(self.base[::step]).abs_()

    def sampled_magnitudes(self, index: int) -> Tensor:
        """|task vector `index`| at about `THRESHOLD_SAMPLE` elements spread over
        it (runs of `SAMPLE_RUN` at a fixed stride), or at every element of a
        smaller tensor: `magnitude_threshold`'s sample."""
        if sample_step(self.numel) == 1:
            return self.delta(index, slice(0, self.numel), self.base).abs_()
        runs = THRESHOLD_SAMPLE // SAMPLE_RUN
        stride = self.numel // runs
        model = self.models[index][: runs * stride].view(runs, stride)[:, :SAMPLE_RUN]
        base = self.base[: runs * stride].view(runs, stride)[:, :SAMPLE_RUN]
        return model.to(self.dtype, copy=True).sub_(base).abs_().reshape(-1)

    @functools.cached_property
    def _stored_models(self) -> tuple[np.ndarray, ...] | None:
        """The models as the compiled loops read them, whole (views, not copies),
        if they share a dtype those loops read as stored."""
        if len({model.dtype for model in self.models}) > 1 or not viewable(self.models[0]):
            return None
        return tuple(kernel_array(model, self.dtype) for model in self.models)

    @functools.cached_property
    def _stored_base(self) -> np.ndarray | None:
        """The base as the compiled loops read it, whole, if read as stored."""
        return kernel_array(self.base, self.dtype) if viewable(self.base) else None

    def kernel_models(self, piece: slice) -> tuple[np.ndarray, ...]:
        """The models on `piece` as the compiled loops read them, in one dtype
        (the compute dtype if theirs differ)."""
        if self._stored_models is not None:
            return tuple(model[piece] for model in self._stored_models)
        models = [model[piece] for model in self.models]
        if len({model.dtype for model in models}) > 1:
            models = [model.to(self.dtype) for model in models]
        return tuple(kernel_array(model, self.dtype) for model in models)

    def kernel_base(self, piece: slice) -> np.ndarray:
        """The base on `piece` as the compiled loops read it."""
        if self._stored_base is not None:
            return self._stored_base[piece]
        return kernel_array(self.base[piece], self.dtype)

    def magnitude_count(self, index: int, low: float, high: float) -> tuple[int, np.ndarray]:
        """How many entries of task vector `index` exceed `high` in magnitude,
        and the magnitudes in [`low`, `high`]: one compiled loop a piece."""
        import torch

        from sdrecipe.methods.kernels import count_and_gather_deltas

        gathered = torch.empty(min(self.numel, PIECE_ELEMENTS), dtype=self.dtype).numpy()
        scalar = gathered.dtype.type
        above, inside = 0, []
        for piece in pieces(self.numel):
            model = (
                self._stored_models[index][piece]
                if self._stored_models is not None
                else kernel_array(self.models[index][piece], self.dtype)
            )
            more, found = count_and_gather_deltas(
                model, self.kernel_base(piece), scalar(low), scalar(high), gathered
            )
            above += more
            inside.append(gathered[:found].copy())
        return above, np.concatenate(inside)

    def square_sums(self) -> np.ndarray:
        """Each task vector's sum of squares in float64, summed piece by piece
        as numpy sums (`square(d, dtype=float64).sum()`)."""
        from sdrecipe.methods.kernels import squared_deltas

        squares = np.zeros(len(self.models))
        buffer = np.empty(min(self.numel, PIECE_ELEMENTS))
        for piece in pieces(self.numel):
            base = self.kernel_base(piece)
            for i, model in enumerate(self.kernel_models(piece)):
                squared_deltas(model, base, self.scalar, buffer)
                squares[i] += buffer[: base.size].sum()
        return squares

    def merged_ties(
        self,
        alpha: float,
        rule: SignRule,
        thresholds: list[float] | None = None,
        masks: list[DropMask] | None = None,
        scale: float = 1.0,
        weights: tuple[list[float], float] | None = None,
    ) -> Tensor:
        """TIES of the task vectors, each dropped by its DARE mask (kept entries
        times `scale`) if `masks` are given and trimmed at its threshold if
        `thresholds` are, added `alpha` times to the base: `ties_merge` in one
        compiled loop per piece, on the operands as stored. `weights` (a weight
        per task vector, and the least total weight divided by) make the
        disjoint mean a weighted one, as SCE's."""

        from sdrecipe.methods.kernels import ties_merge as kernel

        out = result_tensor(self.numel, self.dtype)
        flat = out.numpy()
        scalar = flat.dtype.type
        count = len(self.models)
        limits = (
            np.zeros(count, flat.dtype) if thresholds is None else np.array(thresholds, flat.dtype)
        )
        cutoff = np.uint32(masks[0].cutoff if masks else 0)
        factors, floor = weights or ([1.0] * count, 1.0)
        averaging = (np.array(factors, flat.dtype), scalar(floor))
        for piece in pieces(self.numel):
            size = piece.stop - piece.start
            words = tuple(mask.words(size) for mask in masks) if masks else (NO_WORDS,) * count
            base = self.kernel_base(piece)
            kernel(
                *(self.kernel_models(piece), base, words, cutoff, scalar(scale), limits),
                *(rule == "count", *averaging, scalar(alpha), base, flat[piece]),
            )
        return out.reshape(self.shape)

    def result(self, combine: Callable[[Tensor, slice], Tensor]) -> Tensor:
        """The tensor whose every piece is `combine(base_piece, piece)`."""

        out = result_tensor(self.numel, self.dtype)
        for piece in pieces(self.numel):
            out[piece] = combine(self.base_piece(piece), piece)
        return out.reshape(self.shape)

    def merged(
        self,
        producers: list[Callable[[slice, Tensor], Tensor]],
        merge: Callable[[list[Tensor], Tensor], Tensor],
    ) -> Tensor:
        """The tensor whose every piece is `merge(task vectors, base piece)`, the
        task vectors on it from `producers` (each a function of the piece and
        the base piece)."""

        def combine(base_piece: Tensor, piece: slice) -> Tensor:
            return merge([produce(piece, base_piece) for produce in producers], base_piece)

        return self.result(combine)


def sample_step(numel: int) -> int:
    """The stride at which `magnitude_threshold` samples `numel` magnitudes."""
    return max(1, numel // THRESHOLD_SAMPLE)


def magnitude_threshold(
    magnitudes: Callable[[], Iterator[tuple[slice, Tensor]]],
    numel: int,
    keep: int,
    sample: Tensor | None = None,
    count: Callable[[float, float], tuple[int, np.ndarray]] | None = None,
) -> float:
    """The `keep`-th largest of `numel` magnitudes (0 keeps all, inf keeps none).

    `magnitudes()` yields them piece by piece, in order, each time it is called;
    `sample` holds about `THRESHOLD_SAMPLE` of them spread over all (every one
    when `sample_step(numel)` is 1), if the caller can take it more cheaply
    than a pass (which takes every `sample_step(numel)`-th). The sample
    brackets the threshold; one exact pass then counts the magnitudes above
    the bracket and selects inside it: `count(low, high)`, if the caller has
    a quicker way than `magnitudes()`, gives how many are above `high` and
    those in [`low`, `high`]. The answer is exact whatever the sample: a
    bracket that misses falls back to a selection over all magnitudes.
    """
    import torch

    if keep >= numel:
        return 0.0
    if keep <= 0:
        return math.inf
    step = sample_step(numel)
    if sample is None:
        sample = torch.cat([m[(-p.start) % step :: step] for p, m in magnitudes()])
    # numpy's sort (SIMD) takes a third of the time of its two-index partition.
    ordered = np.sort(sample.numpy())
    if step == 1:  # the sample is every magnitude
        return ordered[ordered.size - keep].item()
    low, high = threshold_bracket(ordered, numel, keep)
    above, inside = (count or _counter(magnitudes))(low, high)
    return bracketed_threshold(magnitudes, keep, above, inside)


def threshold_bracket(ordered: np.ndarray, numel: int, keep: int) -> tuple[float, float]:
    """`magnitude_threshold`'s bracket [low, high] of the `keep`-th largest of `numel`
    magnitudes: values of ranks around its rank in their sorted sample `ordered`."""
    size = ordered.size
    rank = keep / numel * size
    margin = 4.0 * math.sqrt(rank * (1.0 - keep / numel)) + 8.0
    high_rank, low_rank = math.floor(rank - margin), math.ceil(rank + margin)
    high = ordered[size - 1 - high_rank].item() if high_rank >= 0 else math.inf
    low = ordered[size - 1 - low_rank].item() if low_rank < size else 0.0
    return low, high


def bracketed_threshold(magnitudes: Magnitudes, keep: int, above: int, inside: np.ndarray) -> float:
    """The `keep`-th largest magnitude, given how many are above a bracket and those
    inside it (numpy's partition: a tenth of torch's kthvalue), else from all `magnitudes()`."""
    import torch

    wanted = keep - above
    if 0 < wanted <= inside.size:
        return np.partition(inside, inside.size - wanted)[inside.size - wanted].item()
    candidates = torch.cat([m for _, m in magnitudes()])
    return candidates.kthvalue(candidates.numel() - keep + 1).values.item()


def _counter(magnitudes: Magnitudes) -> Callable[[float, float], tuple[int, np.ndarray]]:
    """`magnitude_threshold`'s exact pass over `magnitudes()`."""
    from sdrecipe.methods.kernels import count_and_gather

    def count(low: float, high: float) -> tuple[int, np.ndarray]:
        above, inside = 0, []
        gathered: np.ndarray | None = None
        for _, piece in magnitudes():
            values = piece.numpy()
            if gathered is None or gathered.size < values.size or gathered.dtype != values.dtype:
                gathered = np.empty(values.size, values.dtype)
            scalar = values.dtype.type
            more, found = count_and_gather(values, scalar(low), scalar(high), gathered)
            above += more
            inside.append(gathered[:found].copy())
        return above, np.concatenate(inside)

    return count


def ties_merge(
    deltas: list[Tensor],
    base_piece: Tensor,
    alpha: float,
    rule: SignRule,
    weights: tuple[list[float], float] | None = None,
) -> Tensor:
    """TIES' election and disjoint mean of sparsified task vectors on a piece,
    added `alpha` times to `base_piece` (see `TaskVectors.merged_ties`)."""
    import torch

    from sdrecipe.methods.kernels import ties_merge as kernel

    base = base_piece.numpy()
    scalar = base.dtype.type
    out = np.empty_like(base)
    values = tuple(delta.numpy() for delta in deltas)
    nothing = np.empty(0, base.dtype)
    limits = np.zeros(len(deltas), base.dtype)
    factors, floor = weights or ([1.0] * len(deltas), 1.0)
    kernel(
        *(values, nothing, (NO_WORDS,) * len(values), np.uint32(0), scalar(1.0), limits),
        *(rule == "count", np.array(factors, base.dtype), scalar(floor), scalar(alpha)),
        *(base, out),
    )
    return torch.from_numpy(out)


def mean_added(deltas: list[Tensor], base_piece: Tensor, alpha: float) -> Tensor:
    """`base_piece + alpha·mean(deltas)`, summed in order into the first delta."""
    total = deltas[0]
    for delta in deltas[1:]:
        total.add_(delta)
    return total.mul_(alpha / len(deltas)).add_(base_piece)


def _dropped(
    vectors: TaskVectors, drop: float, seed: int, rescale: bool, key: str
) -> Callable[[int], Callable[[slice, Tensor], Tensor]]:
    """For task vector `index`, a function of (piece, base piece) giving its DARE
    form; pieces must come in order, once each, from a fresh call."""
    scale = 1.0 / (1.0 - drop) if rescale and drop < 1.0 else 1.0

    def for_model(index: int) -> Callable[[slice, Tensor], Tensor]:
        mask = DropMask(drop, seed, key, index)

        def piece_of(piece: slice, base_piece: Tensor) -> Tensor:
            delta = vectors.delta(index, piece, base_piece)
            if drop >= 1.0:
                return delta.zero_()
            return mask.apply(delta, scale)

        return piece_of

    return for_model


def _thresholds(
    vectors: TaskVectors,
    density: float,
    delta_of: Callable[[int], Callable[[slice, Tensor], Tensor]] | None = None,
) -> list[float]:
    """Each task vector's magnitude threshold for keeping its top `density` fraction."""
    keep = int(density * vectors.numel)

    def magnitudes(index: int) -> Callable[[], Iterator[tuple[slice, Tensor]]]:
        def run() -> Iterator[tuple[slice, Tensor]]:
            produce = delta_of(index) if delta_of else None
            for piece in pieces(vectors.numel):
                base_piece = vectors.base_piece(piece)
                delta = (
                    produce(piece, base_piece)
                    if produce
                    else vectors.delta(index, piece, base_piece)
                )
                yield piece, delta.abs_()

        return run

    return [
        magnitude_threshold(magnitudes(i), vectors.numel, keep, None, None)
        if delta_of
        else magnitude_threshold(
            magnitudes(i),
            vectors.numel,
            keep,
            vectors.sampled_magnitudes(i),
            functools.partial(vectors.magnitude_count, i),
        )
        for i in range(len(vectors.models))
    ]


@merge_method(elementwise=False, min_models=2, compiled=True)
def ties(
    base: Tensor,
    *models: Tensor,
    density: Ratio = 0.2,
    alpha: float = 1.0,
    sign: SignRule = "sum",
    dtype: torch.dtype,
) -> Tensor:
    """TIES (arXiv 2306.01708): trim each task vector to its top `density`
    fraction by magnitude, elect each element's sign, average the agreeing
    entries and add `alpha` times that to the base."""
    vectors = TaskVectors(base, models, dtype)
    return vectors.merged_ties(alpha, sign, _thresholds(vectors, density))


@merge_method(elementwise=False, min_models=2, compiled=True)
def dare(
    base: Tensor,
    *models: Tensor,
    drop: Ratio = 0.9,
    alpha: float = 1.0,
    seed: int = 0,
    rescale: bool = True,
    context: KeyContext,
    dtype: torch.dtype,
) -> Tensor:
    """DARE (arXiv 2311.03099): drop each task-vector entry with probability
    `drop`, rescale the rest by 1/(1 - drop), and add `alpha` times the mean of
    the task vectors to the base."""
    vectors = TaskVectors(base, models, dtype)
    delta_of = _dropped(vectors, drop, seed, rescale, context.key)
    producers = [delta_of(i) for i in range(len(models))]
    return vectors.merged(producers, functools.partial(mean_added, alpha=alpha))


@merge_method(elementwise=False, min_models=2, compiled=True)
def dare_ties(
    base: Tensor,
    *models: Tensor,
    drop: Ratio = 0.9,
    alpha: float = 1.0,
    seed: int = 0,
    rescale: bool = True,
    density: Ratio = 1.0,
    sign: SignRule = "sum",
    context: KeyContext,
    dtype: torch.dtype,
) -> Tensor:
    """DARE, then TIES: drop and rescale as `dare`, trim to the top `density`
    fraction (1: no trim, as PEFT and mergekit), elect signs and take the
    disjoint mean, added `alpha` times to the base."""
    import torch

    vectors = TaskVectors(base, models, dtype)
    if drop >= 1.0:  # every task vector is 0: what the disjoint mean of zeros gives
        mean = torch.zeros(vectors.numel, dtype=dtype)
        return mean.mul_(alpha).add_(vectors.base.to(dtype)).reshape(vectors.shape)
    delta_of = _dropped(vectors, drop, seed, rescale, context.key)
    thresholds = _thresholds(vectors, density, delta_of) if density < 1.0 else None
    masks = [DropMask(drop, seed, context.key, i) for i in range(len(models))]
    scale = 1.0 / (1.0 - drop) if rescale else 1.0
    return vectors.merged_ties(alpha, sign, thresholds, masks, scale)


@merge_method(elementwise=False, min_models=3)
def model_stock(
    base: Tensor, *models: Tensor, filter_wise: bool = False, dtype: torch.dtype
) -> Tensor:
    """Model stock (arXiv 2403.19522), as mergekit computes it: with cos the mean
    cosine between pairs of task vectors (per row when `filter_wise`),
    t = n·cos / (1 + (n - 1)·cos) (0 where the denominator vanishes), and the
    result is base + t·mean(task vectors)."""
    import torch

    vectors = TaskVectors(base, models, dtype)
    rows = base.shape[0] if filter_wise and base.dim() > 1 else 1
    width = vectors.numel // rows
    count = len(models)
    pairs = [(i, j) for i in range(count) for j in range(i + 1, count)]
    dots = torch.zeros(len(pairs), rows, dtype=torch.float64)
    squares = torch.zeros(count, rows, dtype=torch.float64)
    for piece in pieces(vectors.numel):
        deltas = [vectors.delta(i, piece, vectors.base_piece(piece)) for i in range(count)]
        # Which row each element of the piece belongs to.
        row_of = torch.arange(piece.start, piece.stop) // width if rows > 1 else None
        for n, delta in enumerate(deltas):
            squares[n] += _row_sums(delta.square(), row_of, rows)
        for n, (i, j) in enumerate(pairs):
            dots[n] += _row_sums(deltas[i] * deltas[j], row_of, rows)
    norms = squares.sqrt()
    cosines = torch.stack(
        [
            (dots[n] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0)
            for n, (i, j) in enumerate(pairs)
        ]
    ).mean(dim=0)
    denominator = 1.0 + (count - 1) * cosines
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, count * cosines / denominator.masked_fill(singular, 1.0))
    factor = t.to(dtype).repeat_interleave(width)

    def combine(base_piece: Tensor, piece: slice) -> Tensor:
        total = vectors.delta(0, piece, base_piece)
        for i in range(1, count):
            total.add_(vectors.delta(i, piece, base_piece))
        return total.mul_(factor[piece] / count).add_(base_piece)

    return vectors.result(combine)


def _row_sums(values: Tensor, row_of: Tensor | None, rows: int) -> Tensor:
    """Sums of `values` per row (float64); one total when `row_of` is None."""
    import torch

    if row_of is None:
        return values.sum(dtype=torch.float64).reshape(1)
    sums = torch.zeros(rows, dtype=torch.float64)
    return sums.index_add_(0, row_of, values.to(torch.float64))


@merge_method(elementwise=False, min_models=2)
def geometric_median(
    *models: Tensor, eps: Positive = 1e-6, max_iter: int = 100, ftol: float = 1e-20
) -> Tensor:
    """The point with the least summed distance to the models, by Weiszfeld's
    iteration from their mean (weights 1/max(distance, eps)), as sd-mecha does:
    it stops after `max_iter` steps or when the mean distance changes by at most
    `ftol` times itself."""
    import torch

    points = torch.stack(models)
    median = points.mean(dim=0)

    def distances(center: Tensor) -> Tensor:
        return torch.stack([torch.dist(point, center) for point in points])

    current = distances(median)
    objective = current.mean()
    for _ in range(max(0, max_iter)):
        weights = 1.0 / current.clamp(min=eps)
        median = (points * weights.reshape(-1, *[1] * median.dim())).sum(dim=0) / weights.sum()
        current = distances(median)
        previous, objective = objective, current.mean()
        if abs(previous - objective) <= ftol * objective:
            break
    return median
