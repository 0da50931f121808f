"""The device paths (methods/device_paths.py) give their CPU functions' bytes:
each run here on CPU tensors against the registered CPU function, over shapes
(small, conv-like, a sampled threshold, several pieces), stored and compute
dtypes, 2 to 4 models, parameters, ties at the thresholds and special values
(signed zeros and infinities: the same bytes; NaNs: NaN at the same places,
the same bytes elsewhere)."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
import torch

from sdrecipe.methods import get_method
from sdrecipe.methods.registry import SAME_BYTES
from sdrecipe.methods.task_vectors import PIECE_ELEMENTS, sample_step
from sdrecipe.recipe.per_key import KeyContext

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# (stored dtypes of the base and up to four models, compute dtype)
STORED = {
    "float16": ((F16,) * 5, F32),
    "bfloat16": ((BF16,) * 5, F32),
    "float32": ((F32,) * 5, F32),
    "mixed": ((F64, F16, BF16, F32, F16), F32),  # a float64 base rounds in the samples
    "float16-in-float64": ((F16,) * 5, F64),
    "mixed-in-float64": ((F32, BF16, F16, F32, BF16), F64),
}
SHAPES = [(7,), (96, 70), (64, 32, 3, 3), (150_001,)]
DEVICE_METHODS = ["ties", "dare", "dare_ties", "breadcrumbs", "breadcrumbs_ties"]


def sprinkle(rng: np.random.Generator, found: np.ndarray, kind: str, infinite: bool) -> None:
    """Zeros of both signs and repeated values (`special`), infinities if
    `infinite`, and for `nan` NaNs, at a few places of `found`."""
    size = found.size
    picks = rng.integers(0, size, (6, max(2, size // 50)))
    found[picks[0]] = 0.0
    found[picks[1]] = -0.0
    found[picks[2]] = 0.5
    found[picks[3]] = -0.5
    if infinite:
        found[picks[4][:3]] = np.inf
        found[picks[4][3:5]] = -np.inf
    if kind == "nan":
        found[picks[5][:2]] = np.nan


def operands(shape, stored, count: int, kind: str, seed: int = 0):
    """A base and `count` models, stored in `stored` (the base's dtype first).
    `finite`: normal values, the models the base plus a twentieth of others
    (many equal magnitudes once rounded); `tied`: multiples of 1/8 in
    [-1/2, 1/2] (every threshold tied at a value held by many, many zero
    entries); `special`: as `finite`, with zeros of both signs, repeated
    values, infinities in the models and models equal to the base at some
    places; `nan`: as `special`, with NaNs in the base and models."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    if kind == "tied":
        found = [rng.integers(-4, 5, size) / 8.0 for _ in range(count + 1)]
    else:
        base = rng.standard_normal(size)
        found = [base] + [base + 0.05 * rng.standard_normal(size) for _ in range(count)]
    if kind in ("special", "nan"):
        sprinkle(rng, found[0], kind, infinite=False)
        for model in found[1:]:
            same = rng.integers(0, size, max(1, size // 20))
            model[same] = found[0][same]
            sprinkle(rng, model, kind, infinite=True)
    pairs = zip(found, stored[: count + 1], strict=True)
    tensors = [torch.from_numpy(v).reshape(shape).to(d) for v, d in pairs]
    return tensors[0], tuple(tensors[1:])


def settings(name: str, large: bool) -> list[dict]:
    """Parameters to try for method `name` (fewer for a large tensor)."""
    if name == "ties":
        grid = itertools.product((0.2, 0.5, 1.0), ("sum", "count"))
        found = [dict(density=d, sign=s, alpha=1.0 if s == "sum" else 0.5) for d, s in grid]
    elif name == "dare":
        grid = itertools.product((0.0, 0.3, 0.9, 1.0), (True, False))
        found = [dict(drop=d, rescale=r, alpha=0.5 if r else 1.0, seed=3) for d, r in grid]
    elif name == "dare_ties":
        grid = itertools.product((0.0, 0.3, 0.9, 1.0), (True, False))
        found = [
            dict(drop=d, rescale=r, density=0.5 if r else 1.0, sign="count" if r else "sum")
            for d, r in grid
        ]
        found += [dict(drop=0.3, density=0.2, alpha=-0.7, seed=5)]
    else:
        found = [
            dict(density=0.9, gamma=0.01, alpha=1.0, sign="sum"),
            dict(density=0.4, gamma=0.2, alpha=0.7, sign="count"),
            dict(density=0.9, gamma=0.0, alpha=1.0, sign="sum"),  # none dropped above
            dict(density=1.0, gamma=0.3, alpha=0.5, sign="sum"),  # all kept
            dict(density=0.6, gamma=0.5, alpha=-0.4, sign="count"),  # none dropped below
            dict(density=0.0, gamma=0.1, alpha=1.0, sign="sum"),  # none kept
            dict(density=0.05, gamma=0.9, alpha=1.3, sign="sum"),
        ]
        if name == "breadcrumbs":
            found = [{k: v for k, v in s.items() if k != "sign"} for s in found]
    return found[::3] if large else found


def run_both(name: str, base, models, params: dict, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU function's result and the device path's, on the same operands."""
    method = get_method(name)
    params = {**params, "dtype": dtype}
    if method.key_aware:
        params["context"] = KeyContext("model.diffusion_model.out.2.weight", "unet")
    copies = [t.clone() for t in (base, *models)]
    want = method.function(base, *models, **params)
    # Every allocation follows the operands: with the default device made "meta",
    # one that names no device would leave the CPU.
    with torch.device("meta"):
        got = method.on_device(base, *models, **params)
    for before, after in zip(copies, (base, *models), strict=True):
        assert torch.equal(before.view(torch.uint8), after.view(torch.uint8))  # unmodified
    return want, got


def assert_same_bytes(want: torch.Tensor, got: torch.Tensor, nan: bool = False) -> None:
    """The same dtype, shape and bytes; with `nan`, NaN at the same places and
    the same bytes elsewhere (a NaN's bits may differ)."""
    assert got.dtype == want.dtype and got.shape == want.shape and got.device == want.device
    left, right = want.reshape(-1).numpy(), got.reshape(-1).numpy()
    bits = f"u{left.itemsize}"
    if nan:
        holes = np.isnan(left)
        assert np.array_equal(holes, np.isnan(right))
        left, right = left[~holes], right[~holes]
    different = np.flatnonzero(left.view(bits) != right.view(bits))
    assert different.size == 0, (different[:5], left[different[:5]], right[different[:5]])


def test_the_methods_with_compiled_loops_have_device_paths_with_the_cpus_bytes():
    for name in DEVICE_METHODS:
        method = get_method(name)
        assert method.device == SAME_BYTES
        assert method.on_device is not None and method.on_device is not method.function


# Each shape with each stored dtype, the kinds of values and the model counts in turn.
CASES = [
    (shape, stored, ("finite", "special", "tied")[i % 3], 2 + i // 3 % 3)
    for i, (shape, stored) in enumerate(itertools.product(SHAPES, STORED))
    if shape[0] < 100_000 or i % 2 == 0  # the sampled thresholds: three dtypes, all kinds
]


@pytest.mark.parametrize("name", DEVICE_METHODS)
@pytest.mark.parametrize(("shape", "stored", "kind", "count"), CASES, ids=str)
def test_device_paths_give_the_cpu_functions_bytes(name, shape, stored, kind, count):
    dtypes, dtype = STORED[stored]
    base, models = operands(shape, dtypes, count, kind, seed=len(shape) + count)
    for params in settings(name, large=base.numel() > 100_000):
        assert_same_bytes(*run_both(name, base, models, params, dtype))


@functools.cache
def several_pieces() -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """A base and three models of six and a bit pieces, an odd size."""
    size = 6 * PIECE_ELEMENTS + 1_001
    assert size > 1_500_000 and sample_step(size) > 1
    return operands((size,), (F16,) * 4, 3, "special", seed=9)


@pytest.mark.parametrize("name", DEVICE_METHODS)
def test_device_paths_over_several_pieces(name):
    """A tensor of several pieces (the CPU's piecewise loops and masks), odd-sized."""
    base, models = several_pieces()
    for params in settings(name, large=True)[:2]:
        assert_same_bytes(*run_both(name, base, models, params, F32))


NAN_CASES = [((96, 70), "float32", 2), ((150_001,), "mixed", 3), ((7,), "float16-in-float64", 4)]


@pytest.mark.parametrize("name", DEVICE_METHODS)
@pytest.mark.parametrize(("shape", "stored", "count"), NAN_CASES, ids=str)
def test_with_nans_the_results_differ_only_in_the_bits_of_their_nans(name, shape, stored, count):
    """Task vectors with NaNs: the thresholds and trims are the CPU's (the other
    entries' bytes), and the result is NaN where the CPU's is."""
    dtypes, dtype = STORED[stored]
    base, models = operands(shape, dtypes, count, "nan", seed=count)
    for params in settings(name, large=True):
        assert_same_bytes(*run_both(name, base, models, params, dtype), nan=True)


def test_a_float8_base_is_converted_exactly():
    """torch does not promote float8 (the CPU functions' samples raise on a float8
    base): the device path gives the CPU's bytes for the base converted first."""
    float8 = getattr(torch, "float8_e4m3fn", None)
    if float8 is None:
        pytest.skip("no float8 in this torch")
    base, models = operands((3_001,), (F32,) * 3, 2, "finite", seed=4)
    stored = base.to(float8)
    for name in DEVICE_METHODS:
        method = get_method(name)
        extra = {"context": KeyContext("k", "unet")} if method.key_aware else {}
        for params in settings(name, large=True)[:2]:
            want = method.function(stored.float(), *models, **params, **extra, dtype=F32)
            got = method.on_device(stored, *models, **params, **extra, dtype=F32)
            assert_same_bytes(want, got)
