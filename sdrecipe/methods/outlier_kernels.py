"""Compiled loops of Model Breadcrumbs' trim (see `sparse._Outliers`): one pass
that counts and gathers both thresholds' brackets, and the trim of each task
vector with its mean or TIES' election and disjoint mean, a block at a time.

As in `kernels`, float16 and bfloat16 operands are read as stored and every
operation is the numpy or torch one it replaced (NaNs included), so the
bytes are the same.
"""

from __future__ import annotations

import numpy as np

from sdrecipe.methods.kernels import (
    _BLOCK,
    _jit,
    _load,
    _torch_difference,
    _torch_sum,
    ties_merge,
)


@_jit
def count_and_gather_brackets(
    model: np.ndarray,
    base: np.ndarray,
    offset: int,
    bounds: np.ndarray,
    counts: np.ndarray,
    magnitudes: np.ndarray,
    flags: np.ndarray,
    values: np.ndarray,
    positions: np.ndarray,
) -> int:
    """`count_and_gather_deltas` for two brackets in one pass (breadcrumbs'
    two thresholds): of the magnitudes of `model - base` (computed into
    `magnitudes`, in its dtype), adds to `counts` how many exceed
    `bounds[0, 1]`, how many exceed `bounds[1, 1]` and how many are NaN;
    copies those inside either bracket [`bounds[k, 0]`, `bounds[k, 1]`], each
    once, to the start of `values` and their flat positions (`offset`, the
    piece's first, plus their index in it) to `positions`, and returns their
    number. `flags` is scratch of a byte a value. The magnitudes and flags in
    one loop, each count in a loop of its own (`_count_beyond`; in the first,
    the three took a fifth longer), then `count_and_gather`'s copy by groups
    of eight, into one output for both brackets: 0.75 ns a value where two
    passes of `count_and_gather_deltas` took 1.5 (and an output each, 1.5)."""
    cast = magnitudes.dtype.type
    size = base.size
    low0, high0, low1, high1 = bounds[0, 0], bounds[0, 1], bounds[1, 0], bounds[1, 1]
    for j in range(size):
        value = abs(cast(_load(model, j)) - cast(_load(base, j)))
        magnitudes[j] = value
        flags[j] = ((value >= low0) & (value <= high0)) | ((value >= low1) & (value <= high1))
    computed = magnitudes[:size]
    nan = _count_beyond(computed, cast(np.inf))
    counts[0] += _count_beyond(computed, high0) - nan
    counts[1] += _count_beyond(computed, high1) - nan
    counts[2] += nan
    end = size - size % 8
    groups = flags[:end].view(np.uint64)
    found = 0
    for group in range(groups.size):
        if groups[group]:
            for j in range(group * 8, group * 8 + 8):
                values[found] = magnitudes[j]
                positions[found] = offset + j
                found += flags[j]
    for j in range(end, size):
        values[found] = magnitudes[j]
        positions[found] = offset + j
        found += flags[j]
    return found


# How `outliers_mean` and `outliers_ties` take each task vector: trimmed below
# and above, trimmed below only, whole, or all zeros.
TRIM, TRIM_LOW, KEEP, ZERO = 0, 1, 2, 3


@_jit
def outliers_mean(
    models: tuple[np.ndarray, ...],
    base: np.ndarray,
    offset: int,
    limits: np.ndarray,
    modes: np.ndarray,
    cuts: np.ndarray,
    scale: np.floating,
    out: np.ndarray,
) -> None:
    """Breadcrumbs on a piece (its first element's flat position `offset`),
    into `out`: task vector i, `models[i] - base`, trimmed as `_trimmed` takes
    row i of `limits`, `modes` and `cuts`, summed in order, times `scale`,
    plus `base`: torch's `total = d0; total += d1 ...; total *= scale; total
    += base`, operation for operation (NaNs included: `_torch_sum`). A block
    at a time, the trimmed task vector in a row that stays in the L1 cache."""
    cast = out.dtype.type
    row = np.empty(min(out.size, _BLOCK), out.dtype)
    for start in range(0, out.size, _BLOCK):
        stop = min(out.size, start + _BLOCK)
        size = stop - start
        total = out[start:stop]
        held = base[start:stop]
        for i in range(len(models)):
            value = total if i == 0 else row[:size]
            model = models[i][start:stop]
            _trimmed(model, held, offset + start, limits[i], modes[i], cuts[i], value)
            if i:
                for j in range(size):
                    total[j] = _torch_sum(total[j], value[j])
        for j in range(size):
            total[j] = _torch_sum(total[j] * scale, cast(_load(held, j)))


@_jit
def outliers_ties(
    models: tuple[np.ndarray, ...],
    base: np.ndarray,
    offset: int,
    limits: np.ndarray,
    modes: np.ndarray,
    cuts: np.ndarray,
    count_rule: bool,
    alpha: np.floating,
    out: np.ndarray,
) -> None:
    """Breadcrumbs-TIES on a piece, into `out`: each task vector trimmed as in
    `outliers_mean`, then `ties_merge` of them (no drop, no trim, weights 1),
    a block at a time, so that the trimmed task vectors stay in the L1 cache."""
    cast = out.dtype.type
    count = len(models)
    rows = np.empty((count, _BLOCK), out.dtype)
    nothing = np.empty(0, out.dtype)
    words = np.empty((count, 0), np.uint32)
    zeros, ones = np.zeros(count, out.dtype), np.ones(count, out.dtype)
    for start in range(0, out.size, _BLOCK):
        stop = min(out.size, start + _BLOCK)
        held = base[start:stop]
        for i in range(count):
            row = rows[i, : stop - start]
            _trimmed(models[i][start:stop], held, offset + start, limits[i], modes[i], cuts[i], row)
        ties_merge(
            *(rows, nothing, words, np.uint32(0), cast(1), zeros, count_rule, ones, cast(1)),
            *(alpha, held, out[start:stop]),
        )


@_jit
def _trimmed(
    model: np.ndarray,
    base: np.ndarray,
    offset: int,
    limits: np.ndarray,
    mode: int,
    cuts: np.ndarray,
    out: np.ndarray,
) -> None:
    """Breadcrumbs' trim of the task vector d = `model - base` on flat
    positions [`offset`, `offset + out.size`), into `out`: `d * kept`, kept
    when |d| is above `limits[0]` and (but for TRIM_LOW) below `limits[1]`,
    or equal to `limits[0]` at a position in [`cuts[0]`, `cuts[1]`), or to
    `limits[1]` in [`cuts[2]`, `cuts[3]`) (the tied magnitudes that the ranks
    keep); `d` for KEEP, 0 for ZERO. One loop per run of positions between
    cuts, in which the kept magnitudes are one range."""
    cast = out.dtype.type
    if mode == KEEP:
        for j in range(out.size):
            out[j] = _torch_difference(cast(_load(model, j)), cast(_load(base, j)))
        return
    if mode == ZERO:
        for j in range(out.size):
            out[j] = cast(0)
        return
    start = 0
    while start < out.size:
        here = offset + start
        stop = out.size
        for cut in cuts:
            if here < cut < offset + stop:
                stop = cut - offset
        low_tie = cuts[0] <= here < cuts[1]
        high_tie = cuts[2] <= here < cuts[3]
        _trim_run(
            model, base, start, stop, limits[0], limits[1], mode == TRIM_LOW, low_tie, high_tie, out
        )
        start = stop


@_jit
def _trim_run(
    model: np.ndarray,
    base: np.ndarray,
    start: int,
    stop: int,
    low: np.floating,
    high: np.floating,
    unbounded: bool,
    low_tie: bool,
    high_tie: bool,
    out: np.ndarray,
) -> None:
    """`_trimmed` on elements [start, stop), where the ties at `low` (at
    `high`) are all kept if `low_tie` (`high_tie`) and none if not. Where
    `low` is a number below `high` (or `unbounded`), kept is one range of
    magnitudes, [`low` or the next float up, `high` or the next float down]
    (none for the float after infinity): two compares an element. Otherwise
    (a NaN, `low` at or above `high`), the rule as written."""
    cast = out.dtype.type
    one = cast(1)
    zero = cast(0)
    infinity = cast(np.inf)
    # Loops over slices from 0: numba wraps an index that may be negative (one
    # from `start`), and such a loop does not vectorise (8x the time).
    model, base, out = model[start:stop], base[start:stop], out[start:stop]
    if low == low and (unbounded or low < high):
        if low_tie:
            least = low
        elif low < infinity:
            least = np.nextafter(low, infinity)
        else:
            least = cast(np.nan)
        if unbounded:
            most = infinity
        elif high_tie:
            most = high
        else:
            most = np.nextafter(high, -infinity)
        for j in range(out.size):
            value = _torch_difference(cast(_load(model, j)), cast(_load(base, j)))
            magnitude = abs(value)
            out[j] = value * (one if (magnitude >= least) & (magnitude <= most) else zero)
    else:
        for j in range(out.size):
            value = _torch_difference(cast(_load(model, j)), cast(_load(base, j)))
            magnitude = abs(value)
            kept = (magnitude > low) & ((magnitude < high) | unbounded)
            kept |= (low_tie & (magnitude == low)) | (high_tie & (magnitude == high))
            out[j] = value * (one if kept else zero)


@_jit
def _count_beyond(values: np.ndarray, bound: np.floating) -> int:
    """How many of `values` (fewer than 2**31) are not at most `bound`: above
    it or NaN. A 32-bit total, so that the loop vectorises eight lanes wide
    (a 64-bit one, four): 0.06 ns a value where that took 0.12."""
    total = np.zeros(1, np.int32)
    for j in range(values.size):
        total[0] += np.int32(not values[j] <= bound)
    return total[0]
