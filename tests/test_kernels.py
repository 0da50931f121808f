"""The compiled loops give the bytes of the numpy and torch expressions they
replaced (sdrecipe's earlier releases computed these, and their locks name
those bytes): TIES' trim, election and disjoint mean, DARE's drop, the
threshold's counting pass, breadcrumbs' trims with their mean or TIES, and SCE's
weighted mean; special values included."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdrecipe.methods import get_method
from sdrecipe.methods.drop_masks import DropMask
from sdrecipe.methods.kernels import count_and_gather, magprune
from sdrecipe.methods.sparse import _ascending_ranks, breadcrumbs, breadcrumbs_ties
from sdrecipe.methods.task_vectors import (
    PIECE_ELEMENTS,
    TaskVectors,
    _thresholds,
    sample_step,
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
    magprune(got, _ascending_ranks(got), words, drop, epsilon, rescale)
    assert got.tobytes() == expected.tobytes()


def reference_threshold(magnitudes, keep):
    """magnitude_threshold as it was: the strided sample brackets the keep-th
    largest, one pass counts above and gathers inside the bracket, a bracket
    that misses selects from all."""
    numel = magnitudes.size
    if keep >= numel:
        return 0.0
    if keep <= 0:
        return math.inf
    step = sample_step(numel)
    ordered = np.sort(magnitudes[::step])
    size = ordered.size
    if step == 1:
        return ordered[size - keep].item()
    rank = keep / numel * size
    margin = 4.0 * math.sqrt(rank * (1.0 - keep / numel)) + 8.0
    high_rank, low_rank = math.floor(rank - margin), math.ceil(rank + margin)
    high = ordered[size - 1 - high_rank].item() if high_rank >= 0 else math.inf
    low = ordered[size - 1 - low_rank].item() if low_rank < size else 0.0
    above = np.count_nonzero(magnitudes > high)
    candidates = torch.from_numpy(magnitudes[(magnitudes >= low) & (magnitudes <= high)])
    wanted = keep - above
    if not 0 < wanted <= candidates.numel():
        candidates, wanted = torch.from_numpy(magnitudes), keep
    return candidates.kthvalue(candidates.numel() - wanted + 1).values.item()


def reference_outliers(delta, density, gamma):
    """Breadcrumbs' trim as numpy computed it before the kernels: entries of
    magnitude strictly between the thresholds, and of those equal to one, the
    ones whose ordinal among them (flat order) falls in the kept ranks."""
    numel = delta.size
    target = int(density * numel)
    bottom = max(0, numel - target - int(gamma * numel))
    stop = bottom + target
    if target >= numel:
        return delta
    if target <= 0:
        return np.zeros_like(delta)
    magnitudes = np.abs(delta)
    low = reference_threshold(magnitudes, numel - bottom)
    high = reference_threshold(magnitudes, numel - stop + 1) if stop < numel else None
    keep = magnitudes > low
    if high is not None:
        keep &= magnitudes < high
    below_low = np.count_nonzero(magnitudes < low)
    ties = [(low, bottom - below_low, stop - below_low)]
    if high is not None and high != low:
        ties.append((high, 0, stop - np.count_nonzero(magnitudes < high)))
    for value, first, last in ties:
        equal = magnitudes == value
        ordinal = np.cumsum(equal) - 1
        keep |= equal & (ordinal >= first) & (ordinal < last)
    return delta * keep


def reference_breadcrumbs(base, models, dtype, density, gamma, alpha, sign):
    """breadcrumbs (`sign` None) or breadcrumbs_ties as numpy and torch computed
    them, the latter's election and mean by `ties_merge`: where NaNs of both signs
    meet, its bytes are the compiled loop's, not numpy's."""
    deltas = [(model.to(dtype) - base.to(dtype)).numpy() for model in models]
    trimmed = [reference_outliers(delta, density, gamma) for delta in deltas]
    if sign is not None:
        tensors = [torch.from_numpy(value) for value in trimmed]
        return ties_merge(tensors, base.to(dtype), alpha, sign).numpy()
    total = torch.from_numpy(trimmed[0].copy())
    for value in trimmed[1:]:
        total.add_(torch.from_numpy(value))
    return total.mul_(alpha / len(trimmed)).add_(base.to(dtype)).numpy()


def breadcrumbs_operands(kind, size, stored):
    """A base and three models: `tied` differ by multiples of 1/16 (a few
    magnitudes, each many times, so every threshold is tied), `special`
    as `special()`, `extreme` with one in 40 entries NaN or infinite (the
    brackets miss; thresholds infinite or NaN). NaNs of both signs meet in
    sums and differences (torch gives the second operand's)."""
    rng = np.random.default_rng(size)
    if kind == "tied":
        base = rng.integers(-64, 64, size) / 16.0
        operands = [base] + [base + rng.integers(-8, 9, size) / 16.0 for _ in range(3)]
        for values in operands[1:]:
            values[rng.integers(0, size, size // 500)] = np.nan
            values[rng.integers(0, size, size // 50)] = -np.inf  # the top 1%: tied at inf
    else:
        operands = [special(rng, size, np.float64) for _ in range(4)]
        if kind == "extreme":
            for values in operands[1:]:
                values[rng.integers(0, size, size // 40)] = np.nan
                values[rng.integers(0, size, size // 40)] = np.inf
            operands[0][rng.integers(0, size, size // 40)] = -np.nan
    tensors = [torch.from_numpy(values).to(stored) for values in operands]
    return tensors[0], tuple(tensors[1:])


BREADCRUMBS_SETTINGS = [
    (0.9, 0.01, 1.0, "sum"),
    (0.4, 0.2, 0.7, "count"),
    (0.9, 0.0, 1.0, "sum"),  # nothing above is dropped
    (1.0, 0.3, 0.5, "sum"),  # everything kept
    (0.6, 0.5, -0.4, "count"),  # nothing below is dropped
    (0.0, 0.1, 1.0, "sum"),  # nothing kept
    (0.05, 0.9, 1.3, "sum"),
    (0.02, 0.5, 1.0, "sum"),  # both thresholds one tied magnitude
    (0.9, 0.06, 1.0, "count"),  # `tied`: the low threshold 0
    (0.9, 0.04, 1.0, "sum"),  # `tied`: the low threshold above 0, its bracket from 0
]


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["tied", "special", "extreme"])
@pytest.mark.parametrize("size", [2 * PIECE_ELEMENTS + 4_099, 9_001])
@pytest.mark.parametrize("ties", [False, True], ids=["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_gives_numpys_bytes(stored, kind, size, ties):
    base, models = breadcrumbs_operands(kind, size, stored)
    assert_breadcrumbs_bytes(base, models, torch.float32, BREADCRUMBS_SETTINGS, ties)


def assert_breadcrumbs_bytes(base, models, dtype, settings, ties):
    """breadcrumbs (or breadcrumbs_ties) gives the reference's bytes at each setting."""
    for density, gamma, alpha, sign in settings:
        params = dict(density=density, gamma=gamma, alpha=alpha, dtype=dtype)
        if ties:
            got = breadcrumbs_ties(base, *models, sign=sign, **params)
        else:
            got = breadcrumbs(base, *models, **params)
        expected = reference_breadcrumbs(
            base, models, dtype, density, gamma, alpha, sign if ties else None
        )
        assert got.dtype == dtype
        assert got.numpy().tobytes() == expected.tobytes(), (density, gamma)


@pytest.mark.parametrize("ties", [False, True], ids=["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_in_float64_of_mixed_operands_gives_numpys_bytes(ties):
    size = PIECE_ELEMENTS + 777
    base, models = breadcrumbs_operands("tied", size, torch.float64)
    models = (models[0].half(), models[1].bfloat16(), models[2])
    assert_breadcrumbs_bytes(base, models, torch.float64, BREADCRUMBS_SETTINGS[:3], ties)


def numpy_sce(base, models, alpha):
    """SCE with every entry selected as numpy and torch computed it before the
    compiled loops: float64 mean squares as weights, TIES' election by sums,
    the weighted mean of the agreeing entries."""
    deltas = [model.astype(np.float32) - base.astype(np.float32) for model in models]
    squares = np.array([np.square(d, dtype=np.float64).sum() for d in deltas])
    means = squares / max(1, base.size)
    total = means.sum()
    count = len(deltas)
    weights = np.full(count, 1.0 / count) if abs(total) < 1e-6 else means / total
    votes = deltas[0].copy()
    for value in deltas[1:]:
        votes += value
    elected = np.where(votes >= 0, 1.0, -1.0).astype(votes.dtype)
    weighted = np.zeros_like(votes)
    weight = np.zeros_like(votes)
    with np.errstate(invalid="ignore"):
        for value, factor in zip(deltas, weights.astype(votes.dtype), strict=True):
            erased = np.multiply(value * elected > 0, factor, dtype=votes.dtype)
            weighted += value * erased
            weight += erased
    merged = np.divide(weighted, np.maximum(weight, 1e-6, out=weight), out=weighted)
    return torch.from_numpy(merged).mul_(alpha).add_(torch.from_numpy(base.astype(np.float32)))


@pytest.mark.parametrize("stored", [np.float16, np.float32])
@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_sce_of_every_entry_gives_the_bytes_of_numpy(stored, alpha):
    """One piece (the float64 sums of squares are numpy's pairwise sums of the
    same arrays) with special values."""
    rng = np.random.default_rng(5)
    values = np.nan_to_num(special(rng, 50_000, np.float32), nan=0.25, posinf=3.0, neginf=-3.0)
    base = values.astype(stored)
    models = [(base + 0.05 * rng.standard_normal(base.size)).astype(stored) for _ in range(3)]
    spec = get_method("sce")
    got = spec.function(
        torch.from_numpy(base), *map(torch.from_numpy, models), alpha=alpha, dtype=torch.float32
    )
    want = numpy_sce(base, models, alpha)
    assert np.array_equal(got.numpy().view(np.uint32), want.numpy().view(np.uint32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("width", [1, 7, 640, 3000])
def test_della_row_ranks_invert_a_stable_argsort(dtype, width):
    """Each entry's rank is its place in numpy's stable argsort of the row's
    magnitudes, NaNs of any payload and sign held equal (above infinity), ties
    by position; a row of one magnitude throughout (no radix pass) by position."""
    rng = np.random.default_rng(width)
    values = special(rng, 30 * width, dtype).reshape(30, width)
    values[:, ::4] = -values[:, :1]  # ties across each row, of both signs
    values[3] = values[3, 0]
    nans = values != values
    if dtype == np.float32:
        values.view(np.uint32)[nans] |= rng.integers(0, 1 << 22, int(nans.sum()), dtype=np.uint32)
    order = np.argsort(np.abs(values), axis=1, kind="stable")
    expected = np.empty(values.shape, np.intp)
    np.put_along_axis(expected, order, np.arange(width)[None, :], axis=1)
    assert np.array_equal(_ascending_ranks(values), expected)


def test_result_buffers_are_reused_only_once_free(monkeypatch):
    """A whole-tensor method's result takes a released result's memory (already
    mapped): the smallest spare that fits, never memory still in use."""
    from sdrecipe.methods import buffers
    from sdrecipe.methods.buffers import POOLED_ELEMENTS, result_tensor

    monkeypatch.setattr(buffers, "_spares", [])
    first = result_tensor(POOLED_ELEMENTS + 5, torch.float32)
    second = result_tensor(POOLED_ELEMENTS, torch.float32)
    assert first.data_ptr() != second.data_ptr()
    first.fill_(1.0)
    second.fill_(2.0)
    address = first.data_ptr()
    shaped = first[1:]  # a view keeps the memory in use
    del first
    third = result_tensor(POOLED_ELEMENTS, torch.float32)
    assert third.data_ptr() not in (address, second.data_ptr())
    assert torch.all(shaped == 1.0) and torch.all(second == 2.0)
    del shaped, third
    # Two spares now (POOLED_ELEMENTS + 5 and POOLED_ELEMENTS): each taken once,
    # the smallest that fits first.
    small = result_tensor(POOLED_ELEMENTS, torch.float32)
    large = result_tensor(POOLED_ELEMENTS, torch.float32)
    assert large.data_ptr() == address and small.data_ptr() not in (address, second.data_ptr())
    assert result_tensor(POOLED_ELEMENTS, torch.float32).data_ptr() not in (
        address,
        small.data_ptr(),
        second.data_ptr(),
    )
    assert result_tensor(POOLED_ELEMENTS, torch.float64).dtype == torch.float64
    assert result_tensor(10, torch.float32).numel() == 10


def test_drop_mask_stream_is_numpys_pcg64():
    """The compiled PCG64 gives numpy's outputs, call after call, whatever the
    counts (below and above the compiled path's threshold, not multiples of 4)."""
    mask = DropMask(0.9, 3, "unet.k", 2)
    reference = np.random.PCG64(mask.generator.state["state"]["state"])
    reference.state = mask.generator.state
    for count in (1, 3, 64, 65, 1000, 262_143, 7, 4096):
        assert np.array_equal(mask.raw(count), reference.random_raw(count))
    assert mask.generator.state == reference.state
