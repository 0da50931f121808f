"""NuSLERP, multi-SLERP and the Karcher mean: against numpy references written
here, against mergekit (the oracle, in float64 on the same values), on every
key of a recipe's build, and at their edges."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import POSITION_IDS, UNET_IN, as32, invoke, write_recipe
from sdrecipe.engine.builder import update_outputs
from sdrecipe.methods import get_method
from sdrecipe.methods.task_vectors import PIECE_ELEMENTS
from sdrecipe.plan.prepare import prepare
from test_advanced_methods import call, models_near

METHODS = ["nuslerp", "nuslerp_delta", "multislerp", "multislerp_delta", "karcher"]
# float32 results of float32 operands, against float64 computations of the same
# definition: within 1e-6 of the largest magnitude (about 16 float32 ulps).
TOLERANCE = 1e-6


def assert_close(result, expected, tolerance=TOLERANCE, what=""):
    result, expected = np.asarray(result, np.float64), np.asarray(expected, np.float64)
    assert result.shape == expected.shape, what
    error = np.abs(result - expected).max(initial=0.0)
    scale = max(np.abs(expected).max(initial=0.0), 1e-30)
    assert error <= tolerance * scale, f"{what}: max abs {error:.3g}, relative {error / scale:.3g}"


# --- references in numpy (float64) -------------------------------------------------------


def reference_nuslerp(t, a, b, base=None, flatten=True, row_wise=False):
    """mergekit's NuSLERP; its colinear test (1 - cos² <= 1e-16) in float32."""
    a, b = (np.asarray(x, np.float64) for x in (a, b))
    if base is not None:
        base = np.asarray(base, np.float64)
        return base + reference_nuslerp(t, a - base, b - base, None, flatten, row_wise)
    shape = a.shape
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif row_wise:
        a, b = np.swapaxes(a, 0, -1), np.swapaxes(b, 0, -1)
    unit_a, unit_b = (
        v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-7) for v in (a, b)
    )
    cos = np.clip((unit_a * unit_b).sum(axis=-1, keepdims=True), -1, 1)
    colinear = 1 - np.square(cos.astype(np.float32)) <= np.float32(1e-16)
    theta = np.arccos(np.where(colinear, 0, cos))
    with np.errstate(divide="ignore", invalid="ignore"):
        spherical = (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)
    result = np.where(colinear, (1 - t) * a + t * b, spherical)
    if row_wise and not flatten:
        result = np.swapaxes(result, 0, -1)
    return result.reshape(shape)


def reference_multislerp(models, base=None, normalize_weights=True, eps=1e-8):
    """mergekit's multi-SLERP of equal weights; the weighted sum where the mean
    of the units vanishes (mergekit: for two models)."""
    points = np.stack([np.asarray(m, np.float64).reshape(-1) for m in models])
    if base is not None:
        points -= np.asarray(base, np.float64).reshape(-1)
    weights = np.full(len(models), 1 / len(models) if normalize_weights else 1.0)
    norms = np.linalg.norm(points, axis=1)
    units = points / (norms + eps)[:, None]
    mean = weights @ units
    if np.linalg.norm(mean) < eps:
        result = weights @ points
    else:
        mean /= np.linalg.norm(mean)
        tangent = weights @ (units - (units @ mean)[:, None] * mean)
        angle = np.linalg.norm(tangent) + eps
        result = (mean * np.cos(angle) + tangent * np.sin(angle) / angle) * (norms @ weights)
    result = result.reshape(np.shape(models[0]))
    return result if base is None else result + base


def reference_karcher(models, max_iter=10, tol=1e-5):
    """mergekit's Karcher mean of equal weights on the unit sphere."""
    points = [np.asarray(m, np.float64).reshape(-1) for m in models]
    norms = [np.linalg.norm(p) for p in points]
    valid = [p / n for p, n in zip(points, norms, strict=True) if n > tol]
    if not valid:
        return np.zeros(np.shape(models[0]))
    weight = 1 / len(valid)
    mean = sum(weight * u for u in valid)
    mean = valid[0].copy() if np.linalg.norm(mean) < tol else mean / np.linalg.norm(mean)
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for unit in valid:
            dot = np.clip(mean @ unit, -1, 1)
            theta = np.arccos(dot)
            if theta >= tol:
                tangent += weight * theta / np.sin(theta) * (unit - dot * mean)
        step = np.linalg.norm(tangent)
        if step < tol:
            break
        mean = np.cos(step) * mean + np.sin(step) * tangent / step
        if np.linalg.norm(mean) > tol:
            mean /= np.linalg.norm(mean)
    return (np.mean(norms) * mean).reshape(np.shape(models[0]))


def reference(method, operands, params):
    """The numpy reference of `method` on `operands` with `params`."""
    if method.startswith("nuslerp"):
        base, (a, b) = (
            (operands[0], operands[1:]) if method == "nuslerp_delta" else (None, operands)
        )
        return reference_nuslerp(params.get("t", 0.5), a, b, base, **_without(params, "t"))
    if method.startswith("multislerp"):
        delta = method == "multislerp_delta"
        base, models = (operands[0], operands[1:]) if delta else (None, operands)
        return reference_multislerp(models, base, **params)
    return reference_karcher(operands, **params)


def _without(params, name):
    return {k: v for k, v in params.items() if k != name}


SETTINGS = {
    "nuslerp": [
        {"t": 0.3},
        {"t": 0.8, "flatten": False},
        {"t": 0.6, "flatten": False, "row_wise": True},
    ],
    "nuslerp_delta": [{"t": 0.4}, {"t": 0.7, "flatten": False, "row_wise": True}],
    "multislerp": [{}, {"normalize_weights": False, "eps": 1e-3}],
    "multislerp_delta": [{}, {"normalize_weights": False}],
    "karcher": [{}, {"max_iter": 2, "tol": 1e-3}],
}
CASES = [(m, p) for m in METHODS for p in SETTINGS[m]]
MODEL_COUNT = {
    "nuslerp": 2,
    "nuslerp_delta": 3,
    "multislerp": 3,
    "multislerp_delta": 4,
    "karcher": 3,
}


def operands_for(method, shape, seed, dtype=np.float16):
    """A base and fine-tunes of it (delta forms), or models far apart."""
    count = MODEL_COUNT[method]
    spread = 0.3 if "delta" in method else 1.0
    base, tuned = models_near(count - 1, shape=shape, seed=seed, spread=spread, dtype=dtype)
    return [base, *tuned]


def check_against_numpy(method, params, shape):
    operands = operands_for(method, shape, seed=len(shape))
    result = call(method, *operands, **params)
    assert result.dtype == np.float32
    assert_close(result, reference(method, [as32(o) for o in operands], params), what=method)


@pytest.mark.parametrize(("method", "params"), CASES)
@pytest.mark.parametrize("shape", [(40, 6, 3, 3), (1, 300), (77,)])
def test_methods_match_numpy(method, params, shape):
    """(1, 300) row-wise is 300 vectors of one element."""
    check_against_numpy(method, params, shape)


# NuSLERP's three layouts, and each other method once.
SPANNING_CASES = [("nuslerp", p) for p in SETTINGS["nuslerp"]] + [
    (m, SETTINGS[m][0]) for m in METHODS[1:]
]


@pytest.mark.parametrize(("method", "params"), SPANNING_CASES)
def test_methods_match_numpy_across_pieces(method, params):
    """Two pieces: of whole rows, of the one flattened vector, and columns
    accumulated over both."""
    assert PIECE_ELEMENTS < 257 * 1031 < 2 * PIECE_ELEMENTS
    check_against_numpy(method, params, (257, 1031))


# --- mergekit, the oracle ----------------------------------------------------------------


class Mergekit:
    """mergekit's methods, called through its public merge-method objects in float64."""

    def __init__(self):
        self.base = pytest.importorskip("mergekit.merge_methods.base")
        self.nuslerp = importlib.import_module("mergekit.merge_methods.nuslerp")
        self.multislerp = importlib.import_module("mergekit.merge_methods.multislerp")
        self.karcher = importlib.import_module("mergekit.merge_methods.karcher")

    def __call__(self, method, operands, params, dtype=torch.float64):
        tensors = [torch.from_numpy(np.asarray(o)).to(dtype) for o in operands]
        based = method.endswith("_delta")
        group = self.base.TensorGroup.from_tensors(tensors, base_index=0 if based else None)
        if method.startswith("nuslerp"):
            t = params.get("t", 0.5)
            parameters = {
                "weight": [1 - t, t],
                "nuslerp_flatten": params.get("flatten", True),
                "nuslerp_row_wise": params.get("row_wise", False),
            }
            merge = self.nuslerp.nuslerp_merge_method
        elif method.startswith("multislerp"):
            parameters = {"weight": 1.0, **params}
            merge = self.multislerp.multislerp
        else:
            parameters = dict(params)
            merge = self.karcher.karcher_merge_method
        return merge([group], parameters=parameters)[0].numpy()


@pytest.fixture(scope="module")
def mergekit():
    return Mergekit()


@pytest.mark.parametrize(("method", "params"), CASES)
@pytest.mark.parametrize("shape", [(1000,), (64, 33), (16, 8, 3, 3)])
def test_methods_equal_mergekit(mergekit, method, params, shape):
    operands = operands_for(method, shape, seed=sum(shape), dtype=np.float32)
    result = call(method, *operands, **params)
    assert_close(result, mergekit(method, operands, params), what=method)


# Each method in a recipe (A is a fine-tune of C, B another model): NuSLERP of
# a whole tensor, of columns and of task-vector rows; multi-SLERP of models and
# of unnormalised task vectors; the Karcher mean.
RECIPE_NODES = {
    "nus": ("nuslerp(A, B, t=0.3)", "nuslerp", {"t": 0.3}),
    "nus_columns": (
        "nuslerp(A, B, t=0.7, flatten=false, row_wise=true)",
        "nuslerp",
        {"t": 0.7, "flatten": False, "row_wise": True},
    ),
    "nusd_rows": (
        "nuslerp_delta(C, A, B, t=0.6, flatten=false)",
        "nuslerp_delta",
        {"t": 0.6, "flatten": False},
    ),
    "ms": ("multislerp(A, B, C)", "multislerp", {}),
    "msd": (
        "multislerp_delta(C, A, B, normalize_weights=false)",
        "multislerp_delta",
        {"normalize_weights": False},
    ),
    "k": ("karcher(A, B, C)", "karcher", {}),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory, models):
    """Every RECIPE_NODES node, built at once (float32 outputs, no cache)."""
    folder = tmp_path_factory.mktemp("spherical")
    nodes = ", ".join(f'{name}: "{text}"' for name, (text, _, _) in RECIPE_NODES.items())
    outputs = ", ".join(
        f"{name}: {{path: {name}.safetensors, dtype: float32}}" for name in RECIPE_NODES
    )
    recipe = write_recipe(
        folder,
        f"""
        inputs: {{A: {models["finetune"]}, B: {models["other"]}, C: {models["base"]}}}
        nodes: {{{nodes}}}
        outputs: {{{outputs}}}
        """,
    )
    update_outputs(prepare(recipe), threads=2)
    return {name: load_file(folder / f"{name}.safetensors") for name in RECIPE_NODES}


def recipe_operands(node, arrays, key):
    text = RECIPE_NODES[node][0]
    names = text[text.index("(") + 1 :].replace(")", "").split(", ")
    named = {"A": "finetune", "B": "other", "C": "base"}
    return [arrays[named[n]][key] for n in names if n in named]


@pytest.mark.parametrize("node", sorted(RECIPE_NODES))
def test_every_key_of_a_build_equals_mergekit(mergekit, built, arrays, node):
    _, method, params = RECIPE_NODES[node]
    out = built[node]
    a = arrays["finetune"]
    assert out.keys() == a.keys()
    np.testing.assert_array_equal(out[POSITION_IDS], a[POSITION_IDS])
    compared = 0
    for key in a:
        if key == POSITION_IDS:
            continue
        assert out[key].dtype == np.float32, key
        operands = recipe_operands(node, arrays, key)
        expected = mergekit(method, operands, params)
        assert_close(out[key], expected, what=f"{node} {key}")
        compared += 1
    assert compared == len(a) - 1


@pytest.mark.parametrize(
    ("method", "operands"),
    [
        ("nuslerp", "parallel"),
        ("nuslerp", "zero"),
        ("nuslerp_delta", "zero"),
        ("multislerp", "antiparallel"),
        ("multislerp", "zero"),
        ("multislerp_delta", "zero"),
        ("karcher", "antiparallel"),
        ("karcher", "zero"),
    ],
)
def test_edges_equal_mergekit_in_float32(mergekit, method, operands):
    """At the edges mergekit's branches decide: compared with mergekit in
    float32, the dtype in which sdrecipe takes NuSLERP's colinear test."""
    a = as32(models_near(0, shape=(30, 7), seed=3)[0])
    b = as32(models_near(0, shape=(30, 7), seed=4)[0])
    pair = {"parallel": [a, 2 * a], "antiparallel": [a, -a], "zero": [np.zeros_like(a), b]}
    models = pair[operands]
    if method.endswith("_delta"):
        models = [b, b + models[0], b + models[1]]
    for params in [{"t": 0.25}, {"t": 0.8, "flatten": False}] if "nuslerp" in method else [{}]:
        expected = mergekit(method, models, params, dtype=torch.float32)
        assert_close(call(method, *models, **params), expected, what=f"{method} {operands}")


def test_nuslerp_of_antiparallel_rows_departs_from_mergekits_rounding(mergekit):
    """x and -x are colinear, so linear: (1 - 2t)·x. mergekit in float32 sees
    that only where its float32 cos θ reaches -1; a row whose cos θ misses by
    an ulp takes the spherical branch, which there is cos(tπ)·x. sdrecipe's
    cos θ, from float64 sums, rounds to -1 on every row."""
    a = as32(models_near(0, shape=(30, 7), seed=3)[0])
    result = call("nuslerp", a, -a, t=0.8, flatten=False)
    np.testing.assert_allclose(result, -0.6 * a, rtol=1e-6, atol=1e-7)
    expected = mergekit("nuslerp", [a, -a], {"t": 0.8, "flatten": False}, dtype=torch.float32)
    rows = torch.from_numpy(a)
    units = rows / rows.norm(dim=-1, keepdim=True)
    colinear = ((units * -units).sum(-1).clamp(-1, 1) == -1).numpy()
    assert 0 < colinear.sum() < len(a)  # both kinds of row occur here
    np.testing.assert_allclose(result[colinear], expected[colinear], rtol=1e-6, atol=1e-7)
    spherical = math.cos(0.8 * math.pi) * a[~colinear]
    np.testing.assert_allclose(expected[~colinear], spherical, rtol=1e-2, atol=1e-6)


def test_multislerp_of_cancelling_models_departs_from_mergekit(mergekit):
    """Three or more models whose units' mean vanishes: mergekit raises, sdrecipe
    takes the weighted sum (for two models mergekit does so too)."""
    a = as32(models_near(0, shape=(12, 5))[0])
    zero = np.zeros_like(a)
    with pytest.raises(ValueError, match="weighted sum"):
        mergekit("multislerp", [zero, zero, zero], {})
    np.testing.assert_array_equal(call("multislerp", zero, zero, zero), zero)
    np.testing.assert_array_equal(call("multislerp_delta", a, a, a, a), a)
    np.testing.assert_array_equal(call("multislerp", a, -a, a, -a), zero)


# --- edges -------------------------------------------------------------------------------


@pytest.mark.parametrize("flatten", [True, False])
def test_nuslerp_of_parallel_and_antiparallel_vectors_is_linear(flatten):
    a = np.linspace(-1, 1, 64, dtype=np.float16).reshape(8, 8)
    a32 = as32(a)
    for factor, expected in ((2, 1.25), (-1, 0.5), (-2, 0.25)):
        b = (factor * a32).astype(np.float16)
        result = call("nuslerp", a, b, t=0.25, flatten=flatten)
        np.testing.assert_allclose(result, expected * a32, rtol=1e-6, atol=1e-7)
    # Per row: rows parallel, antiparallel or at an angle, each on its own.
    b = as32(models_near(0, shape=(8, 8), seed=2)[0])
    b[0], b[1], b[2] = 3 * a32[0], -a32[1], 0
    result = call("nuslerp", a32, b, t=0.6, flatten=False)
    np.testing.assert_allclose(result[0], 0.4 * a32[0] + 1.8 * a32[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result[1], -0.2 * a32[1], rtol=1e-6, atol=1e-6)
    assert_close(result, reference_nuslerp(0.6, a32, b, flatten=False))


def test_nuslerp_with_a_zero_operand_follows_mergekits_right_angle():
    """A zero vector has cos θ = 0 with anything: θ = π/2, weights sin((1 - t)·π/2)
    and sin(t·π/2)."""
    _, (b,) = models_near(1, shape=(20, 9))
    zero = np.zeros_like(b)
    result = call("nuslerp", zero, b, t=0.3)
    np.testing.assert_allclose(result, math.sin(0.3 * math.pi / 2) * as32(b), rtol=1e-6)
    np.testing.assert_array_equal(call("nuslerp", zero, zero, t=0.3), as32(zero))
    base, (a,) = models_near(1, shape=(20, 9), seed=1)
    result = call("nuslerp_delta", base, base, a, t=0.7)
    expected = as32(base) + math.sin(0.7 * math.pi / 2) * (as32(a) - as32(base))
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("flatten", [True, False])
def test_nuslerp_ends_are_the_models(flatten):
    base, (a, b) = models_near(2, shape=(30, 11), spread=1.0)
    for t, end in ((0.0, a), (1.0, b)):
        np.testing.assert_array_equal(call("nuslerp", a, b, t=t, flatten=flatten), as32(end))
        result = call("nuslerp_delta", base, a, b, t=t, flatten=flatten, row_wise=True)
        # float16 operands: their differences and the sum back are exact in float32.
        np.testing.assert_array_equal(result, as32(end))


def test_multislerp_of_parallel_and_zero_models():
    a = as32(models_near(0, shape=(16, 4), seed=5)[0])
    zero = np.zeros_like(a)
    # The same direction: the mean norm times it.
    assert_close(call("multislerp", a, 2 * a, 3 * a), 2 * a)
    assert_close(call("multislerp", a, 2 * a, normalize_weights=False), 3 * a)
    # Two antipodal models: their weighted sum, 0.
    np.testing.assert_allclose(call("multislerp", a, -a), zero, atol=1e-7)
    np.testing.assert_array_equal(call("multislerp", zero, zero), zero)
    # A zero model counts in the weights and the mean norm, not the direction.
    assert_close(call("multislerp", zero, a), a / 2)
    np.testing.assert_array_equal(call("multislerp_delta", a, a, a), a)


def test_karcher_of_parallel_antipodal_and_zero_models():
    a = as32(models_near(0, shape=(16, 4), seed=6)[0])
    b = as32(models_near(0, shape=(16, 4), seed=7)[0])
    zero = np.zeros_like(a)
    assert_close(call("karcher", a, 2 * a, 3 * a), 2 * a)
    assert_close(call("karcher", a, a), a)
    # Antipodal: the units' mean vanishes, so the first unit is the mean.
    assert_close(call("karcher", a, -a), a)
    # Models of norm at most `tol` leave the direction, not the mean norm.
    assert_close(call("karcher", zero, b), b / 2)
    small = (1e-7 * a).astype(np.float32)
    mean_norm = (np.linalg.norm(small) + np.linalg.norm(b)) / 2
    assert_close(call("karcher", small, b), mean_norm * b / np.linalg.norm(b))
    np.testing.assert_array_equal(call("karcher", zero, zero), zero)
    # No steps: the normalised mean of the units, times the mean norm.
    units = a / np.linalg.norm(a) + b / np.linalg.norm(b)
    expected = units / np.linalg.norm(units) * (np.linalg.norm(a) + np.linalg.norm(b)) / 2
    assert_close(call("karcher", a, b, max_iter=0), expected)


def test_karcher_converges_to_the_spherical_mean():
    """On two units the Karcher mean is their midpoint; on three its tangent vanishes."""
    rng = np.random.default_rng(9)
    points = [rng.standard_normal(500) for _ in range(3)]
    units = [p / np.linalg.norm(p) for p in points]
    result = call("karcher", *[u.astype(np.float32) for u in units], max_iter=50, tol=1e-7)
    mean = result.astype(np.float64) / np.linalg.norm(result)
    tangent = sum(
        np.arccos(np.clip(mean @ u, -1, 1))
        / np.sin(np.arccos(np.clip(mean @ u, -1, 1)))
        * (u - (mean @ u) * mean)
        for u in units
    )
    assert np.linalg.norm(tangent) < 1e-5
    midpoint = call("karcher", units[0].astype(np.float32), units[1].astype(np.float32))
    assert_close(midpoint, (units[0] + units[1]) / np.linalg.norm(units[0] + units[1]))


def test_parameters_are_checked():
    for method, params in [
        ("nuslerp", {"t": 1.5}),
        ("nuslerp_delta", {"t": -0.1}),
        ("multislerp", {"eps": 0.0}),
        ("karcher", {"max_iter": -1}),
        ("karcher", {"tol": 0.0}),
        ("karcher", {"max_iter": 2.5}),
    ]:
        with pytest.raises(ValueError, match=method):
            get_method(method).validate(params)
    assert get_method("karcher").check_model_count(1)
    assert get_method("nuslerp_delta").check_model_count(2)
    assert get_method("multislerp_delta").check_model_count(2) is None


def test_the_methods_are_listed():
    listing = invoke("methods").output
    for method in METHODS:
        assert f"{method}(" in listing, method
    assert "multislerp_delta(base, *models, normalize_weights=True, eps=1e-08)" in listing


# --- the engine's rules ------------------------------------------------------------------

CHANNEL_CALLS = {
    "nuslerp": "nuslerp(A, B, t=0.4)",
    "nuslerp_delta": "nuslerp_delta(A, B, C, t=0.4)",
    "multislerp": "multislerp(A, B, C)",
    "multislerp_delta": "multislerp_delta(A, B, C)",
    "karcher": "karcher(A, B, C)",
}


@pytest.fixture(scope="module")
def inpainting_built(tmp_path_factory, models):
    """Each method with the inpainting model first (the input layer only)."""
    folder = tmp_path_factory.mktemp("spherical-inpainting")
    selection = r"include_keys: ['input_blocks\.0\.0\.weight']"
    nodes = "".join(
        f"\n  {method}: {{expression: '{text}', {selection}}}"
        for method, text in CHANNEL_CALLS.items()
    )
    outputs = "".join(
        f"\n  {method}: {{path: {method}.safetensors, dtype: float32}}" for method in METHODS
    )
    inputs = f"{{A: {models['inpainting']}, B: {models['finetune']}, C: {models['base']}}}"
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"inputs: {inputs}\nnodes:{nodes}\noutputs:{outputs}\n")
    update_outputs(prepare(recipe), threads=2)
    return {method: load_file(folder / f"{method}.safetensors")[UNET_IN] for method in METHODS}


@pytest.mark.parametrize("method", METHODS)
def test_methods_follow_the_inpainting_channel_rule(inpainting_built, arrays, method):
    out = inpainting_built[method]
    a = as32(arrays["inpainting"][UNET_IN])
    assert out.shape == a.shape
    np.testing.assert_array_equal(out[:, 4:], a[:, 4:])
    assert not np.array_equal(out[:, :4], a[:, :4])


@pytest.mark.parametrize("method", METHODS)
def test_methods_never_modify_their_operands(method):
    """float32 operands reach a method without a copy: it must leave them as they are."""
    operands = operands_for(method, (40, 30), seed=1, dtype=np.float32)
    before = [o.copy() for o in operands]
    for params in SETTINGS[method]:
        call(method, *operands, **params)
    for operand, original in zip(operands, before, strict=True):
        np.testing.assert_array_equal(operand, original)
