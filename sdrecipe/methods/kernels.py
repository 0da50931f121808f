"""Compiled loops for the task-vector methods' per-element work.

TIES' trim, sign election and disjoint mean, DARE's drop mask and a top-k
threshold's counting pass each took several numpy passes over every piece
(temporaries, boolean masks); each here is one loop over the piece, compiled
by numba on first use (and cached on disk), releasing the GIL so the
executor's workers run side by side. Every loop does the arithmetic of the
numpy expressions it replaces, operation for operation, in the compute dtype
(float32 or float64): no fast-math, no reassociation, a product by a 0/1 mask
stays a product (NaN stays NaN, -0 stays -0), so the bytes are numpy's.

Importing this module imports numba (a few tenths of a second): the methods
import it when they first compute.
"""

from __future__ import annotations

import numba
import numpy as np

_jit = numba.njit(nogil=True, cache=True, error_model="numpy")


@_jit
def count_and_gather(
    values: np.ndarray, low: np.floating, high: np.floating, out: np.ndarray
) -> tuple[int, int]:
    """How many of `values` exceed `high`; those in [`low`, `high`] are copied
    to the start of `out`, and their number is returned second. Branch-free
    (each value is stored, the count moves on only for one inside): the
    branches were mispredicted often enough to triple the time."""
    above = 0
    found = 0
    for j in range(values.size):
        value = values[j]
        above += value > high
        out[found] = value
        found += (value >= low) & (value <= high)
    return above, found


@_jit
def drop(delta: np.ndarray, words: np.ndarray, cutoff: np.uint32, scale: np.floating) -> None:
    """DARE, in place: `delta *= (words >= cutoff)`, then `delta *= scale`."""
    one = delta.dtype.type(1)
    zero = delta.dtype.type(0)
    for j in range(delta.size):
        delta[j] = delta[j] * (one if words[j] >= cutoff else zero) * scale


@_jit
def ties_merge(
    deltas: tuple[np.ndarray, ...],
    thresholds: np.ndarray,
    count_rule: bool,
    alpha: np.floating,
    base: np.ndarray,
    out: np.ndarray,
    total: np.ndarray,
    count: np.ndarray,
) -> None:
    """TIES on a piece, into `out`: each delta trimmed in place below its
    threshold (`d * (|d| >= t)`); each element's sign elected by the sum of
    the trimmed values (a tie elects +) or, with `count_rule`, by the sum of
    their signs (a tie elects none); the agreeing values averaged
    (`total / max(count, 1)`, 0 where none agrees), times `alpha`, plus
    `base`. `total` and `count` are scratch arrays as long as the piece.
    Loops over the piece, one model at a time, so that they vectorise."""
    one = base.dtype.type(1)
    zero = base.dtype.type(0)
    votes = out
    for i in range(len(deltas)):
        delta = deltas[i]
        threshold = thresholds[i]
        for j in range(base.size):
            value = delta[j] * (one if abs(delta[j]) >= threshold else zero)
            delta[j] = value
            vote = np.sign(value) if count_rule else value
            votes[j] = vote if i == 0 else votes[j] + vote
    total[:] = zero
    count[:] = zero
    for i in range(len(deltas)):
        delta = deltas[i]
        for j in range(base.size):
            vote = votes[j]
            elected = np.sign(vote) if count_rule else (one if vote >= zero else -one)
            agrees = one if delta[j] * elected > zero else zero
            total[j] += delta[j] * agrees
            count[j] += agrees
    for j in range(base.size):
        out[j] = total[j] / max(count[j], one) * alpha + base[j]
