"""The compiled loops give the bytes of the numpy and torch expressions they
replaced (sdrecipe's earlier releases computed these, and their locks name
those bytes): TIES' trim, election and disjoint mean, DARE's drop, and the
threshold's counting pass; special values included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdrecipe.methods.kernels import count_and_gather, magprune
from sdrecipe.methods.sparse import _ascending_order
from sdrecipe.methods.task_vectors import (
    PIECE_ELEMENTS,
    DropMask,
    TaskVectors,
    _thresholds,
    ties_merge,
)


def numpy_ties(deltas, base, alpha, rule, thresholds):
    """TIES on a piece as numpy and torch computed it before the kernels."""
    values = [d.copy() for d in deltas]
    if thresholds is not None:
        for value, threshold in zip(values, thresholds, strict=True):
            np.multiply(value, np.abs(value) >= threshold, out=value)
    votes = values[0].copy() if rule == "sum" else np.sign(values[0])
    for value in values[1:]:
        votes += value if rule == "sum" else np.sign(value)
    if rule == "sum":
        elected = np.where(votes >= 0, 1.0, -1.0).astype(votes.dtype)
    else:
        elected = np.sign(votes)
    total = np.zeros_like(values[0])
    count = np.zeros_like(values[0])
    with np.errstate(invalid="ignore"):
        for value in values:
            agrees = value * elected > 0
            total += np.multiply(value, agrees, out=value)
            count += agrees
    mean = torch.from_numpy(np.divide(total, np.maximum(count, 1.0, out=count), out=total))
    return mean.mul_(alpha).add_(torch.from_numpy(base)).numpy()


def special(rng, size, dtype):
    """Normal values with zeros of both signs, ties, infinities and NaNs."""
    values = rng.standard_normal(size).astype(dtype)
    picks = rng.integers(0, size, (6, size // 50))
    values[picks[0]] = 0.0
    values[picks[1]] = -0.0
    values[picks[2]] = 0.5
    values[picks[3]] = -0.5
    values[picks[4][:3]] = np.inf
    values[picks[5][:2]] = np.nan
    return values


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rule", ["sum", "count"])
@pytest.mark.parametrize("models", [2, 3])
def test_ties_merge_gives_numpys_bytes(dtype, rule, models):
    rng = np.random.default_rng(models)
    deltas = [special(rng, 10_007, dtype) for _ in range(models)]
    base = special(rng, 10_007, dtype)
    for alpha in (0.3, 1.0, -0.7):
        expected = numpy_ties(deltas, base, alpha, rule, None)
        tensors = [torch.from_numpy(d.copy()) for d in deltas]
        got = ties_merge(tensors, torch.from_numpy(base), alpha, rule).numpy()
        assert got.dtype == dtype
        assert got.tobytes() == expected.tobytes(), (rule, alpha)


STORED = {
    "float16": [torch.float16] * 4,
    "bfloat16": [torch.bfloat16] * 4,
    "float32": [torch.float32] * 4,
    "mixed": [torch.float32, torch.float16, torch.bfloat16, torch.float16],
    "float64": [torch.float64, torch.float16, torch.float16, torch.float16],
}


@pytest.mark.parametrize("stored", STORED)
@pytest.mark.parametrize("rule", ["sum", "count"])
@pytest.mark.parametrize("dropped", [False, True])
def test_merged_ties_on_stored_operands_gives_numpys_bytes(stored, rule, dropped):
    """TaskVectors.merged_ties reads float16 and bfloat16 as stored, over pieces:
    the bytes of converting with torch, subtracting, dropping, trimming and
    electing as before."""
    rng = np.random.default_rng(11)
    size = PIECE_ELEMENTS + 5_001  # two pieces
    operands = [torch.from_numpy(special(rng, size, np.float64)).to(d) for d in STORED[stored]]
    base, models = operands[0], tuple(operands[1:])
    dtype = torch.float64 if torch.float64 in STORED[stored] else torch.float32
    thresholds = [0.4, 0.0, 1.1]
    drop, scale = 0.6, 1.0 / 0.4
    vectors = TaskVectors(base, models, dtype)
    masks = [DropMask(drop, 3, "k", i) for i in range(3)] if dropped else None
    got = vectors.merged_ties(0.7, rule, thresholds, masks, scale if dropped else 1.0)
    deltas = [(m.to(dtype) - base.to(dtype)) for m in models]
    if dropped:
        references = [DropMask(drop, 3, "k", i) for i in range(3)]
        kept = [torch.from_numpy(r.words(size) >= r.cutoff) for r in references]
        deltas = [d.mul_(k).mul_(scale) for d, k in zip(deltas, kept, strict=True)]
    expected = numpy_ties(
        [d.numpy() for d in deltas], base.to(dtype).numpy(), 0.7, rule, thresholds
    )
    assert got.dtype == dtype
    assert got.numpy().tobytes() == expected.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_count_and_gather_counts_above_and_keeps_inside_in_order(dtype):
    rng = np.random.default_rng(3)
    values = np.abs(special(rng, 20_011, dtype))
    low, high = dtype(0.4), dtype(1.1)
    out = np.empty_like(values)
    above, found = count_and_gather(values, low, high, out)
    assert above == np.count_nonzero(values > high)
    inside = values[(values >= low) & (values <= high)]
    assert found == inside.size > 0
    assert out[:found].tobytes() == inside.tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("drop", [0.0, 0.3, 0.9])
def test_the_drop_mask_gives_torchs_bytes(dtype, drop):
    rng = np.random.default_rng(5)
    delta = torch.from_numpy(special(rng, 4_099, np.float64)).to(dtype)
    scale = 1.0 / (1.0 - drop)
    words = DropMask(drop, 7, "unet.k", 1).words(delta.numel())
    kept = torch.from_numpy(words >= DropMask(drop, 7, "unet.k", 1).cutoff)
    expected = delta.clone().mul_(kept).mul_(scale)
    got = DropMask(drop, 7, "unet.k", 1).apply(delta.clone(), scale)
    assert got.numpy().tobytes() == expected.numpy().tobytes()


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("density", [0.2, 0.9])
def test_ties_thresholds_from_stored_operands_are_the_exact_kth_largest(stored, density):
    rng = np.random.default_rng(2)
    size = 2 * PIECE_ELEMENTS + 999
    base = torch.from_numpy(rng.standard_normal(size)).to(stored)
    models = tuple(torch.from_numpy(rng.standard_normal(size)).to(stored) for _ in range(2))
    got = _thresholds(TaskVectors(base, models, torch.float32), density)
    keep = int(density * size)
    for threshold, model in zip(got, models, strict=True):
        magnitudes = np.abs(model.float().numpy() - base.float().numpy())
        assert threshold == np.sort(magnitudes)[::-1][keep - 1]


def numpy_magprune(values, words, drop, epsilon, rescale):
    """DELLA's MagPrune as numpy computed it before the kernel (in place)."""
    magnitudes = np.abs(values)
    width = magnitudes.shape[1]
    if width == 1:
        drops = np.full(magnitudes.shape, drop)
    else:
        order = np.argsort(magnitudes, axis=1, kind="stable")
        ranks = np.empty(magnitudes.shape, dtype=np.float64)
        np.put_along_axis(ranks, order, np.arange(width, dtype=np.float64)[None, :], axis=1)
        ranks /= width - 1
        drops = np.clip((drop + epsilon) - (2.0 * epsilon) * ranks, 0.0, 1.0)
    cutoff = np.minimum(np.rint(drops * 2.0**32), 2.0**32 - 1)
    keep = (words >= cutoff) & (drops < 1.0)
    zeros = np.zeros_like(drops)
    factor = np.divide(1.0, 1.0 - drops, out=zeros, where=keep) if rescale else keep
    with np.errstate(invalid="ignore"):  # infinity times 0
        np.multiply(values, factor.astype(values.dtype), out=values)
    return values


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", [1, 7, 640])
@pytest.mark.parametrize(("drop", "epsilon", "rescale"), [(0.3, 0.1, True), (0.9, 0.3, False)])
def test_magprune_gives_numpys_bytes(dtype, width, drop, epsilon, rescale):
    rng = np.random.default_rng(width)
    values = special(rng, 40 * width, dtype).reshape(40, width)
    values[:, ::3] = values[:, :1]  # equal magnitudes: ranked by position
    words = DropMask(0.0, 1, "k", 0).words(values.size).reshape(values.shape)
    expected = numpy_magprune(values.copy(), words, drop, epsilon, rescale)
    got = values.copy()
    magprune(got, _ascending_order(np.abs(got)), words, drop, epsilon, rescale)
    assert got.tobytes() == expected.tobytes()
