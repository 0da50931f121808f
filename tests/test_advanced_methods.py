"""The advanced merge methods against references written here in plain numpy,
called directly on tensors and built end to end from recipes."""

from __future__ import annotations

import math
import sys
import threading

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import POSITION_IDS, UNET_IN, as32, invoke, write_recipe
from sdrecipe.engine.builder import update_outputs
from sdrecipe.methods import get_method
from sdrecipe.methods.drop_masks import DropMask
from sdrecipe.methods.registry import preload_kernels, registered_methods
from sdrecipe.methods.task_vectors import PIECE_ELEMENTS, magnitude_threshold
from sdrecipe.plan.prepare import prepare
from sdrecipe.recipe.per_key import KeyContext

F32 = torch.float32


def call(method: str, *tensors: np.ndarray, key: str = "k", **params):
    """The registered method on float16 tensors, its defaults filled in, as numpy."""
    spec = get_method(method)
    values = spec.validate(params)
    if spec.takes_dtype:
        values["dtype"] = F32
        args = [torch.from_numpy(t) for t in tensors]
    else:
        args = [torch.from_numpy(t).float() for t in tensors]
    if spec.key_aware:
        values["context"] = KeyContext(key, "unet")
    return spec.function(*args, **values).numpy()


def models_near(count: int, shape=(96, 70), seed: int = 0, spread: float = 0.05, dtype=np.float16):
    """A base and `count` fine-tunes of it, float16 unless told."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(dtype)
    tuned = [
        (base.astype(np.float32) + spread * rng.standard_normal(shape)).astype(dtype)
        for _ in range(count)
    ]
    return base, tuned


# --- the element-wise three-model family -------------------------------------------------


def reference_three_model(method, a, b, c, alpha, beta):
    if method == "triple_sum":
        return (1 - alpha - beta) * a + alpha * b + beta * c
    if method == "sum_twice":
        return (1 - beta) * ((1 - alpha) * a + alpha * b) + beta * c
    if method == "train_difference":
        with np.errstate(invalid="ignore"):
            share = np.nan_to_num(np.abs(b - a) / (np.abs(b - a) + np.abs(b - c)), nan=0.0)
        return a + 1.8 * alpha * (b - c) * share
    if method == "multiply_difference":
        magnitude = np.abs(a - c) ** (1 - alpha) * np.abs(b - c) ** alpha
        return c + np.copysign(magnitude, (1 - beta) * a + beta * b - c)
    assert method == "similarity_add_difference"
    with np.errstate(invalid="ignore"):
        similarity = (a * b / np.maximum(np.abs(a), np.abs(b)) ** 2 + 1) / 2
    similarity = np.nan_to_num(similarity * beta, nan=beta)
    return (1 - similarity) * (a + alpha * (b - c)) + similarity * (
        (1 - alpha / 2) * a + alpha / 2 * b
    )


THREE_MODEL = ["triple_sum", "sum_twice", "multiply_difference", "similarity_add_difference"]


@pytest.mark.parametrize("method", [*THREE_MODEL, "train_difference"])
@pytest.mark.parametrize(("alpha", "beta"), [(0.3, 0.2), (0.8, 0.6), (0.0, 1.0)])
def test_three_model_methods_match_numpy(method, alpha, beta):
    base, (a, b) = models_near(2)
    c = base.copy()
    c[:3] = 0  # zeros: the 0/0 cases of the similarity and train-difference shares
    a[:2] = 0
    b[1:3] = 0
    params = {"alpha": alpha} if method == "train_difference" else {"alpha": alpha, "beta": beta}
    result = call(method, a, b, c, **params)
    expected = reference_three_model(method, as32(a), as32(b), as32(c), alpha, beta)
    if method == "multiply_difference":
        # Where the direction is a rounding error from 0, its sign is arbitrary.
        direction = (1 - beta) * as32(a) + beta * as32(b) - as32(c)
        settled = np.abs(direction) > 1e-5
        result, expected = result[settled], expected[settled]
    np.testing.assert_allclose(result, expected, rtol=2e-5, atol=2e-6)


def test_train_difference_keeps_a_where_b_equals_c():
    base, (a,) = models_near(1)
    np.testing.assert_array_equal(call("train_difference", a, base, base), as32(a))


# --- SLERP -------------------------------------------------------------------------------


def reference_slerp(t, a, b, threshold=0.9995, eps=1e-8):
    """The dvschultz / mergekit SLERP on flattened float64 vectors."""
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norm_a, norm_b = np.linalg.norm(a64), np.linalg.norm(b64)
    dot = np.clip(
        np.dot(a64 / (norm_a if norm_a > eps else 1), b64 / (norm_b if norm_b > eps else 1)), -1, 1
    )
    if abs(dot) > threshold:
        result = (1 - t) * a64 + t * b64
    else:
        theta = math.acos(dot)
        result = (math.sin((1 - t) * theta) * a64 + math.sin(t * theta) * b64) / math.sin(theta)
    return result.reshape(a.shape)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_numpy_on_the_whole_tensor(t):
    rng = np.random.default_rng(1)
    # More elements than one piece: norms and the dot product accumulate over pieces.
    a = rng.standard_normal(PIECE_ELEMENTS + 4099).astype(np.float16)
    b = rng.standard_normal(PIECE_ELEMENTS + 4099).astype(np.float16)
    result = call("slerp", a, b, t=t)
    np.testing.assert_allclose(result, reference_slerp(t, as32(a), as32(b)), rtol=1e-4, atol=1e-5)
    # Unit vectors at an angle keep unit norm all the way.
    if 0 < t < 1:
        unit_a, unit_b = (v / np.linalg.norm(as32(v)) for v in (a, b))
        assert abs(np.linalg.norm(call("slerp", unit_a, unit_b, t=t)) - 1.0) < 1e-3


def test_slerp_of_parallel_vectors_is_linear():
    a = np.linspace(-1, 1, 64, dtype=np.float16)
    b = (2 * a.astype(np.float32)).astype(np.float16)
    np.testing.assert_allclose(call("slerp", a, b, t=0.25), 1.25 * as32(a), rtol=1e-6)
    # Anti-parallel: linear too (mergekit's |dot| > threshold).
    np.testing.assert_allclose(call("slerp", a, -b, t=0.25), 0.25 * as32(a), atol=1e-6)


def test_slerp_per_row_interpolates_each_row_on_its_own():
    _, (a, b) = models_near(2, shape=(40, 33), spread=1.0)
    result = call("slerp", a, b, t=0.4, per_row=True)
    for row in range(40):
        expected = reference_slerp(0.4, as32(a[row]), as32(b[row]))
        np.testing.assert_allclose(result[row], expected, rtol=1e-4, atol=1e-5)


# --- TIES and DARE -----------------------------------------------------------------------


def reference_trim(delta, density):
    """Keep the entries at least as large as the int(density·n)-th largest magnitude."""
    keep = int(density * delta.size)
    if keep == 0:
        return np.zeros_like(delta)
    threshold = np.sort(np.abs(delta).ravel())[::-1][keep - 1]
    return np.where(np.abs(delta) >= threshold, delta, 0)


def reference_disjoint_mean(deltas, rule):
    stacked = np.stack(deltas)
    if rule == "sum":
        elected = np.where(stacked.sum(axis=0) >= 0, 1.0, -1.0)
    else:
        elected = np.sign(np.sign(stacked).sum(axis=0))
    agrees = np.sign(stacked) == elected
    count = agrees.sum(axis=0)
    return (stacked * agrees).sum(axis=0) / np.maximum(count, 1)


@pytest.mark.parametrize("rule", ["sum", "count"])
@pytest.mark.parametrize(("density", "count"), [(0.2, 3), (0.5, 2), (1.0, 4), (0.0, 2)])
def test_ties_matches_numpy(rule, density, count):
    base, tuned = models_near(count, seed=count)
    result = call("ties", base, *tuned, density=density, alpha=0.7, sign=rule)
    deltas = [reference_trim(as32(t) - as32(base), density) for t in tuned]
    expected = as32(base) + 0.7 * reference_disjoint_mean(deltas, rule)
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-7)


def test_ties_count_rule_drops_conflicts_between_two_models():
    base = np.zeros(4, dtype=np.float16)
    b = np.array([1, -1, 2, 0], dtype=np.float16)
    c = np.array([1, 1, -2, 3], dtype=np.float16)
    counted = call("ties", base, b, c, density=1.0, sign="count")
    summed = call("ties", base, b, c, density=1.0, sign="sum")
    np.testing.assert_array_equal(counted, [1, 0, 0, 3])
    # By sums: 0 elects + (the paper, PEFT and mergekit).
    np.testing.assert_array_equal(summed, [1, 1, 2, 3])


@pytest.mark.parametrize("numel", [1, 7, 5000, 3 * PIECE_ELEMENTS + 17])
@pytest.mark.parametrize("density", [0.0, 1e-6, 0.2, 0.9, 1.0])
def test_magnitude_threshold_is_the_exact_kth_largest(numel, density):
    rng = np.random.default_rng(numel)
    # Repeated values and zeros too: the bracket must not need distinct values.
    values = np.abs(rng.standard_normal(numel)).astype(np.float16).astype(np.float32)
    values[::5] = 0
    tensor = torch.from_numpy(values)
    keep = int(density * numel)

    def magnitudes():
        for start in range(0, numel, PIECE_ELEMENTS):
            yield slice(start, start + PIECE_ELEMENTS), tensor[start : start + PIECE_ELEMENTS]

    threshold = magnitude_threshold(magnitudes, numel, keep)
    if keep == 0:
        assert threshold == math.inf
    elif keep >= numel:
        assert threshold == 0.0
    else:
        assert threshold == np.sort(values)[::-1][keep - 1]


COMPILED = ["ties", "dare", "dare_ties", "breadcrumbs", "breadcrumbs_ties"]
COMPILED += ["della", "della_ties", "sce"]


def test_methods_on_compiled_loops_are_marked_and_preloaded():
    """A build that calls one of them loads the loops while it prepares."""
    assert sorted(m.name for m in registered_methods() if m.compiled) == sorted(COMPILED)
    preload_kernels()
    loading = [t for t in threading.enumerate() if t.name == "sdrecipe-kernels"]
    for thread in loading:
        thread.join(timeout=60)
    assert "sdrecipe.methods.kernels" in sys.modules
    assert not any(thread.is_alive() for thread in loading)


def dare_masks(key: str, seed: int, drop: float, count: int, numel: int):
    """The masks sdrecipe documents: word i of the PCG64 stream seeded per
    (seed, key, model) decides element i."""
    masks = [DropMask(drop, seed, key, i) for i in range(count)]
    return [mask.words(numel) >= mask.cutoff for mask in masks]


def test_dare_drops_and_rescales_as_documented():
    base, tuned = models_near(3, shape=(300, 257))
    drop = 0.9
    result = call("dare", base, *tuned, drop=drop, alpha=0.5, seed=7, key="k")
    masks = dare_masks("k", 7, drop, 3, base.size)
    deltas = [
        (as32(t) - as32(base)).ravel() * m / (1 - drop) for t, m in zip(tuned, masks, strict=True)
    ]
    expected = as32(base) + 0.5 * (sum(deltas) / 3).reshape(base.shape)
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)
    for mask in masks:
        # Kept with probability 0.1: within 5 standard deviations of the mean.
        kept = mask.mean()
        assert abs(kept - 0.1) < 5 * math.sqrt(0.1 * 0.9 / mask.size)


def test_dare_masks_depend_on_seed_key_and_model_only():
    first = dare_masks("unet.a", 1, 0.5, 2, 10_000)
    assert np.array_equal(first[0], dare_masks("unet.a", 1, 0.5, 1, 10_000)[0])
    assert not np.array_equal(first[0], first[1])
    assert not np.array_equal(first[0], dare_masks("unet.b", 1, 0.5, 1, 10_000)[0])
    assert not np.array_equal(first[0], dare_masks("unet.a", 2, 0.5, 1, 10_000)[0])
    # Drawn in pieces or at once: the same mask.
    mask = DropMask(0.5, 1, "unet.a", 0)
    assert np.array_equal(
        np.concatenate([mask.words(4096), mask.words(5904)]) >= mask.cutoff, first[0]
    )


def test_dare_with_nothing_dropped_is_the_mean_task_vector():
    base, tuned = models_near(2)
    result = call("dare", base, *tuned, drop=0.0, alpha=1.0)
    expected = as32(base) + sum(as32(t) - as32(base) for t in tuned) / 2
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)
    assert np.array_equal(call("dare", base, *tuned, drop=1.0), as32(base))


@pytest.mark.parametrize(("density", "rule"), [(1.0, "sum"), (0.3, "count")])
def test_dare_ties_drops_then_trims_then_elects(density, rule):
    base, tuned = models_near(3, seed=5)
    result = call("dare_ties", base, *tuned, drop=0.6, seed=3, density=density, sign=rule)
    masks = dare_masks("k", 3, 0.6, 3, base.size)
    deltas = [
        reference_trim(((as32(t) - as32(base)).ravel() * m / 0.4).reshape(base.shape), density)
        for t, m in zip(tuned, masks, strict=True)
    ]
    expected = as32(base) + reference_disjoint_mean(deltas, rule)
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)


# --- model stock, geometric median, rotate ---------------------------------------------


def reference_model_stock(base, tuned, rows: bool):
    base64 = base.astype(np.float64)
    deltas = [t.astype(np.float64) - base64 for t in tuned]
    shape = (base.shape[0], -1) if rows else (1, -1)
    flat = [d.reshape(shape) for d in deltas]
    cosines = []
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            norms = np.linalg.norm(flat[i], axis=1) * np.linalg.norm(flat[j], axis=1)
            cosines.append(
                np.clip((flat[i] * flat[j]).sum(axis=1) / np.maximum(norms, 1e-6), -1, 1)
            )
    cosine = np.mean(cosines, axis=0)
    n = len(tuned)
    t = n * cosine / (1 + (n - 1) * cosine)
    mean = sum(flat) / n
    return (base64.reshape(shape) + t[:, None] * mean).reshape(base.shape)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_numpy(filter_wise):
    base, tuned = models_near(3, shape=(50, 80))
    # Correlated task vectors, so that the angle between them matters.
    shared = as32(tuned[0]) - as32(base)
    tuned = [(as32(t) + shared).astype(np.float16) for t in tuned]
    result = call("model_stock", base, *tuned, filter_wise=filter_wise)
    expected = reference_model_stock(as32(base), [as32(t) for t in tuned], filter_wise)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)


def test_geometric_median_matches_weiszfeld_in_numpy():
    _, points = models_near(4, shape=(30, 20), spread=1.0)
    points32 = [as32(p).astype(np.float64) for p in points]
    median = sum(points32) / 4
    for _ in range(50):
        weights = [1 / max(np.linalg.norm(p - median), 1e-6) for p in points32]
        median = sum(w * p for w, p in zip(weights, points32, strict=True)) / sum(weights)
    result = call("geometric_median", *points, max_iter=50)
    # Weiszfeld converges slowly: float32 and float64 iterates part at about 1e-4.
    np.testing.assert_allclose(result, median, rtol=1e-3, atol=5e-4)
    # An outlier moves the median far less than the mean.
    outlier = (as32(points[0]) + 100).astype(np.float16)
    moved = call("geometric_median", *points, outlier) - result
    assert np.abs(moved).mean() < 0.2 * (100 / 5)


def reference_rotate(a, b, alignment: int, alpha: float):
    """sd-mecha's rotate for tall matrices and whole alignments, in float64 numpy."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    mean_a, mean_b = a64.mean(0), b64.mean(0)
    a_c, b_c = a64 - mean_a, b64 - mean_b
    u, _, vh = np.linalg.svd(a_c.T @ b_c, full_matrices=False)
    q = u @ vh
    a_c = (1 - alpha) * a_c + alpha * (b_c @ q.T)
    a_c = a_c @ np.linalg.matrix_power(q, alignment)
    return a_c + (1 - alignment) * mean_a + alignment * mean_b


@pytest.mark.parametrize(("alignment", "alpha"), [(1, 0.0), (1, 0.5), (0, 0.3), (2, 0.0)])
def test_rotate_matches_numpy_procrustes(alignment, alpha):
    _, (a, b) = models_near(2, shape=(64, 24), spread=1.0)
    result = call("rotate", a, b, alignment=float(alignment), alpha=alpha)
    np.testing.assert_allclose(
        result, reference_rotate(as32(a), as32(b), alignment, alpha), rtol=1e-3, atol=1e-4
    )


@pytest.mark.parametrize("shape", [(64, 24), (12, 40)])
def test_rotate_halfway_twice_is_the_whole_rotation(shape):
    _, (a, b) = models_near(2, shape=shape, spread=1.0)
    a_t, b_t = (torch.from_numpy(as32(v)) for v in (a, b))
    full = call("rotate", a, b, alignment=1.0)
    half = call("rotate", a, b, alignment=0.5)
    # alignment=0.5 moves A a rotation part of the way: its distance to the full
    # rotation is less than A's own, and it stays finite.
    assert np.isfinite(half).all()
    assert np.linalg.norm(half - full) < np.linalg.norm(a_t.numpy() - full)
    assert np.linalg.norm(a_t.numpy() - b_t.numpy()) > 0


def test_rotate_ends_are_the_models():
    _, (a, b) = models_near(2, shape=(10, 6), spread=1.0)
    np.testing.assert_array_equal(call("rotate", a, b, alignment=0.0, alpha=0.0), as32(a))
    np.testing.assert_array_equal(call("rotate", a, b, alignment=1.0, alpha=1.0), as32(b))


# --- from recipes ------------------------------------------------------------------------

RECIPE_CALLS = {
    "triple_sum": "triple_sum(A, B, C, alpha=0.3, beta=0.2)",
    "sum_twice": "sum_twice(A, B, C, alpha=0.4, beta=0.3)",
    "train_difference": "train_difference(A, B, C, alpha=0.8)",
    "multiply_difference": "multiply_difference(A, B, C, alpha=0.4, beta=0.6)",
    "similarity_add_difference": "similarity_add_difference(A, B, C, alpha=0.5, beta=0.7)",
    "slerp": "slerp(A, B, t=0.3)",
    "ties": "ties(C, A, B, density=0.3, alpha=0.9)",
    "dare": "dare(C, A, B, drop=0.5, seed=4)",
    "dare_ties": "dare_ties(C, A, B, drop=0.5, seed=4)",
    "model_stock": "model_stock(C, A, B)",
    "geometric_median": "geometric_median(A, B, C, max_iter=5)",
    "rotate": "rotate(A, B, alignment=1.0, alpha=0.2)",
}


def expected_value(method: str, key: str, a, b, c):
    """The value of RECIPE_CALLS[method] at one key, from numpy references."""
    if method in THREE_MODEL or method == "train_difference":
        params = dict(triple_sum=(0.3, 0.2), sum_twice=(0.4, 0.3), train_difference=(0.8, 0))
        params.update(multiply_difference=(0.4, 0.6), similarity_add_difference=(0.5, 0.7))
        return reference_three_model(method, a, b, c, *params[method])
    if method == "slerp":
        return reference_slerp(0.3, a, b)
    if method == "ties":
        deltas = [reference_trim(x - c, 0.3) for x in (a, b)]
        return c + 0.9 * reference_disjoint_mean(deltas, "sum")
    if method in ("dare", "dare_ties"):
        masks = dare_masks(key, 4, 0.5, 2, c.size)
        deltas = [
            ((x - c).ravel() * m / 0.5).reshape(c.shape) for x, m in zip((a, b), masks, strict=True)
        ]
        if method == "dare":
            return c + (deltas[0] + deltas[1]) / 2
        return c + reference_disjoint_mean(deltas, "sum")
    if method == "model_stock":
        return reference_model_stock(c, [a, b], rows=False)
    return None  # geometric_median and rotate: checked directly above


def build_node(folder, models, node: str, inputs=("finetune", "other", "base")):
    """Build `out: NODE` (YAML flow text) over fixture models as A, B and C, in float32."""
    a, b, c = (models[name] for name in inputs)
    recipe = write_recipe(
        folder,
        f"""
        inputs: {{A: {a}, B: {b}, C: {c}}}
        nodes: {{out: {node}}}
        outputs: {{out: {{path: out.safetensors, dtype: float32}}}}
        """,
    )
    update_outputs(prepare(recipe), threads=2)
    return load_file(folder / "out.safetensors")


@pytest.mark.parametrize("method", sorted(RECIPE_CALLS))
def test_each_method_builds_from_a_recipe(tmp_path, models, arrays, method):
    out = build_node(tmp_path, models, f'"{RECIPE_CALLS[method]}"')
    a, b, c = (arrays[n] for n in ("finetune", "other", "base"))
    np.testing.assert_array_equal(out[POSITION_IDS], a[POSITION_IDS])
    checked = 0
    for key in list(a)[::40]:
        if key == POSITION_IDS:
            continue
        expected = expected_value(method, key, as32(a[key]), as32(b[key]), as32(c[key]))
        assert np.isfinite(out[key]).all(), key
        if expected is not None:
            np.testing.assert_allclose(out[key], expected, rtol=1e-4, atol=1e-5, err_msg=key)
            checked += 1
    assert checked > 5 or method in ("geometric_median", "rotate")


@pytest.mark.parametrize("method", ["ties", "slerp", "train_difference", "dare"])
def test_methods_follow_the_inpainting_channel_rule(tmp_path, models, arrays, method):
    call_text = RECIPE_CALLS[method].replace("(C, A, B", "(A, B, C")
    inputs = ("inpainting", "finetune", "base")
    out = build_node(tmp_path, models, f'"{call_text}"', inputs)[UNET_IN]
    a = as32(arrays["inpainting"][UNET_IN])
    assert out.shape == a.shape
    np.testing.assert_array_equal(out[:, 4:], a[:, 4:])
    assert not np.array_equal(out[:, :4], a[:, :4])


def test_block_weighted_ties_uses_each_blocks_density(tmp_path, models, arrays):
    node = "{method: ties, models: [C, A, B], density: {default: 0.5, IN00: 0.0, OUT*: 1.0}}"
    out = build_node(tmp_path, models, node)
    a, b, c = (arrays[n] for n in ("finetune", "other", "base"))
    # IN00 is input_blocks.0: density 0 keeps nothing, so the base stays.
    np.testing.assert_array_equal(out[UNET_IN], as32(c[UNET_IN]))
    out_key = "model.diffusion_model.output_blocks.3.0.out_layers.3.weight"
    base_key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    for key, density in ((out_key, 1.0), (base_key, 0.5)):
        deltas = [reference_trim(as32(x[key]) - as32(c[key]), density) for x in (a, b)]
        expected = as32(c[key]) + reference_disjoint_mean(deltas, "sum")
        np.testing.assert_allclose(out[key], expected, rtol=1e-5, atol=1e-6, err_msg=key)


def test_dare_gives_the_same_bytes_at_one_and_two_threads(tmp_path, models):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["finetune"]}, B: {models["other"]}, C: {models["base"]}}}
        nodes: {{out: "dare_ties(C, A, B, drop=0.7, seed=11)"}}
        outputs: {{out: out.safetensors}}
        """,
    )
    assert invoke("build", str(recipe), "-j", "1", "--no-cache").exit_code == 0
    first = (tmp_path / "out.safetensors").read_bytes()
    (tmp_path / "out.safetensors").unlink()
    assert invoke("build", str(recipe), "-j", "2", "--no-cache").exit_code == 0
    assert (tmp_path / "out.safetensors").read_bytes() == first
    recipe.write_text(recipe.read_text().replace("seed=11", "seed=12"))
    assert invoke("build", str(recipe), "-j", "2", "--no-cache").exit_code == 0
    assert (tmp_path / "out.safetensors").read_bytes() != first


@pytest.mark.parametrize("method", sorted(RECIPE_CALLS))
def test_methods_never_modify_their_operands(method):
    """float32 operands reach a method without a copy: it must leave them as they are."""
    spec = get_method(method)
    count = 3 if spec.variadic or len(spec.model_names) == 3 else 2
    base, tuned = models_near(count - 1, shape=(40, 30), dtype=np.float32)
    operands = [base, *tuned]
    before = [o.copy() for o in operands]
    call(method, *operands)
    for operand, original in zip(operands, before, strict=True):
        np.testing.assert_array_equal(operand, original)
