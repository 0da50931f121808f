"""Model Breadcrumbs, DELLA and SCE: against references written here in numpy,
against mergekit (the `oracles` extra) on small tensors and on every key of a
built model, and built end to end from recipes.

sdrecipe ranks equal magnitudes (and variances) by flat index, as a stable sort
does; mergekit sorts with torch's unstable sort, so the oracle is given a
stable one. The random float32 tensors here have no ties; the float16 ones and
the synthetic models have many, which is what the stable order is checked on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import UNET_IN, as32, write_recipe
from sdrecipe.arch import component_of
from sdrecipe.engine.builder import update_outputs
from sdrecipe.methods import get_method
from sdrecipe.plan.prepare import prepare
from test_advanced_methods import call, models_near, reference_disjoint_mean

METHODS = ["breadcrumbs", "breadcrumbs_ties", "della", "della_ties", "sce"]
# Tight: sdrecipe and the references sum the same float32 values in another
# order, and take 1/p and SCE's weights in float64 where mergekit uses float32.
RTOL, ATOL = 1e-6, 1e-7


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One intra-op thread, as the executor's workers use: these tensors are small,
    and two test processes share two cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- references --------------------------------------------------------------------------


def reference_outliers(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """mergekit's magnitude_outliers with a stable sort: of the n entries ranked
    by magnitude (then flat index), ranks [b, b + int(density·n)) are kept,
    b = max(0, n - int(density·n) - int(gamma·n))."""
    flat = delta.ravel()
    n = flat.size
    target = int(density * n)
    bottom = max(0, n - target - int(gamma * n))
    order = np.argsort(np.abs(flat), kind="stable")
    keep = np.zeros(n, dtype=bool)
    keep[order[bottom : bottom + target]] = True
    return np.where(keep, flat, 0).reshape(delta.shape)


def stream_words(seed: int, key: str, index: int, count: int) -> np.ndarray:
    """README's stream: NumPy's PCG64 seeded with the 128-bit BLAKE2b digest of
    seed, key and model index; its 32-bit words, the low half of each output first."""
    digest = hashlib.blake2b(f"{seed}\0{key}\0{index}".encode(), digest_size=16).digest()
    raw = np.random.PCG64(int.from_bytes(digest, "little")).random_raw((count + 1) // 2)
    return raw.astype("<u8").view("<u4")[:count]


def della_rows(delta: np.ndarray) -> np.ndarray:
    """DELLA's rows: dim 0's, flattened; a tensor of one dimension or none is one row."""
    return delta.reshape(delta.shape[0], -1) if delta.ndim > 1 else delta.reshape(1, -1)


def reference_magprune(delta, drop, epsilon, seed, key, index, rescale=True):
    """(the sparsified task vector, its keep mask, the keep probabilities), as README says."""
    rows = della_rows(delta)
    width = rows.shape[1]
    if drop <= 0:
        return delta, np.ones(rows.shape, dtype=bool), np.ones(rows.shape)
    if width == 1:
        drops = np.full(rows.shape, drop)
    else:
        ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1)
        drops = np.clip(drop + epsilon - 2 * epsilon * ranks / (width - 1), 0.0, 1.0)
    words = stream_words(seed, key, index, rows.size).reshape(rows.shape)
    keep = (words >= np.minimum(np.rint(drops * 2**32), 2**32 - 1)) & (drops < 1)
    if drop >= 1:
        keep[:] = False
    scale = np.where(keep, 1 / np.maximum(1 - drops, 1e-300) if rescale else 1.0, 0.0)
    return (rows * scale.astype(np.float32)).reshape(delta.shape), keep, 1 - drops


def reference_della(
    base, tuned, drop, epsilon, seed, key, ties=False, sign="sum", alpha=1.0, rescale=True
):
    deltas = [
        reference_magprune(t - base, drop, epsilon, seed, key, i, rescale)[0]
        for i, t in enumerate(tuned)
    ]
    merged = reference_disjoint_mean(deltas, sign) if ties else sum(deltas) / len(deltas)
    return base + alpha * merged


def reference_sce(base, tuned, select_topk, alpha=1.0):
    """mergekit's sce_merge with a stable top-k, in numpy."""
    vectors = np.stack([t - base for t in tuned])
    if select_topk < 1:
        variance = vectors.astype(np.float64).var(axis=0).astype(np.float32)
        # torch multiplies the int64 count by a float in float32.
        k = int(np.float32(np.count_nonzero(variance)) * np.float32(select_topk))
        keep = np.zeros(variance.size, dtype=bool)
        keep[np.argsort(-variance.ravel(), kind="stable")[:k]] = True
        vectors = vectors * keep.reshape(variance.shape)
    means = np.square(vectors.astype(np.float64)).reshape(len(tuned), -1).mean(axis=1)
    weights = np.full(len(tuned), 1 / len(tuned)) if means.sum() < 1e-6 else means / means.sum()
    elected = np.where(vectors.sum(axis=0) >= 0, 1.0, -1.0)
    erased = (np.sign(vectors) == elected) * weights.reshape(-1, *[1] * base.ndim)
    return base + alpha * (vectors * erased).sum(axis=0) / np.maximum(erased.sum(axis=0), 1e-6)


def reference(method: str, base, tuned, params: dict, key: str = "k") -> np.ndarray:
    """What `method(base, *tuned, **params)` computes at `key`, in numpy."""
    p = dict(get_method(method).validate(params))
    if method.startswith("breadcrumbs"):
        deltas = [reference_outliers(t - base, p["density"], p["gamma"]) for t in tuned]
        if method == "breadcrumbs":
            return base + p["alpha"] * sum(deltas) / len(deltas)
        return base + p["alpha"] * reference_disjoint_mean(deltas, p["sign"])
    if method.startswith("della"):
        return reference_della(
            base,
            tuned,
            p["drop"],
            p["epsilon"],
            p["seed"],
            key,
            ties=method == "della_ties",
            sign=p.get("sign", "sum"),
            alpha=p["alpha"],
            rescale=p["rescale"],
        )
    return reference_sce(base, tuned, p["select_topk"], p["alpha"])


# --- against the numpy references ---------------------------------------------------------

SETTINGS = {
    "breadcrumbs": [dict(density=0.9, gamma=0.01), dict(density=0.4, gamma=0.2, alpha=0.7)],
    "breadcrumbs_ties": [
        dict(density=0.8, gamma=0.05),
        dict(density=0.3, gamma=0.9, alpha=0.6, sign="count"),
    ],
    "della": [dict(drop=0.3, epsilon=0.1, seed=2), dict(drop=0.7, epsilon=0.25, alpha=0.8)],
    "della_ties": [
        dict(drop=0.5, epsilon=0.15, seed=4),
        dict(drop=0.2, epsilon=0.1, alpha=1.3, sign="count", rescale=False),
    ],
    "sce": [dict(select_topk=0.3), dict(select_topk=1.0, alpha=0.5)],
}
CASES = [(m, s) for m in METHODS for s in (0, 1)]


@pytest.mark.parametrize(("method", "setting"), CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16-ties"])
def test_methods_match_numpy(method, setting, dtype):
    # 4-D: DELLA's rows are dim 0's; float16 differences tie in magnitude often.
    base, tuned = models_near(3, shape=(24, 5, 3, 3), seed=setting, dtype=dtype)
    params = SETTINGS[method][setting]
    result = call(method, base, *tuned, key="unet.k", **params)
    expected = reference(method, as32(base), [as32(t) for t in tuned], params, key="unet.k")
    np.testing.assert_allclose(result, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("method", METHODS)
def test_methods_match_numpy_across_pieces(method):
    # More than one piece, of an odd number of elements (DELLA's are whole rows:
    # 261 of 1001), float16 ties among them.
    base, tuned = models_near(2, shape=(300, 1001), seed=7)
    params = SETTINGS[method][0]
    result = call(method, base, *tuned, key="unet.k", **params)
    expected = reference(method, as32(base), [as32(t) for t in tuned], params, key="unet.k")
    np.testing.assert_allclose(result, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(5, 0), (0,), (0, 4)])
def test_methods_take_empty_tensors(method, shape):
    """A tensor of no elements merges to its own shape (DELLA's rows of
    nothing divided by zero)."""
    empty = np.zeros(shape, dtype=np.float32)
    result = call(method, empty, empty, empty, key="unet.k", **SETTINGS[method][0])
    assert result.shape == shape


def test_breadcrumbs_ranks_equal_magnitudes_by_flat_index():
    base = np.zeros(10, dtype=np.float32)
    model = np.array([5, 1, 2, -2, 2, 2, 1, 4, 2, 3], dtype=np.float32)
    # n = 10: keep 5, drop the top 1 and the 10 - 5 - 1 = 4 smallest: both 1s and
    # the first two 2s by index.
    result = call("breadcrumbs", base, model, density=0.5, gamma=0.1)
    np.testing.assert_array_equal(result, [0, 0, 0, 0, 2, 2, 0, 4, 2, 3])
    # Density 1 keeps everything, whatever gamma (mergekit's magnitude_outliers).
    np.testing.assert_array_equal(call("breadcrumbs", base, model, density=1.0, gamma=0.5), model)
    np.testing.assert_array_equal(call("breadcrumbs", base, model, density=0.0), base)


def test_della_with_epsilon_0_is_dare_bit_for_bit():
    base, tuned = models_near(3, shape=(70, 90), seed=3)
    for method in ("dare", "dare_ties"):
        della = call(method.replace("dare", "della"), base, *tuned, drop=0.6, epsilon=0.0, seed=9)
        assert np.array_equal(della, call(method, base, *tuned, drop=0.6, seed=9)), method


def test_della_clips_probabilities_that_mergekit_refuses():
    base, tuned = models_near(2, shape=(30, 40), seed=4)
    tuned32, base32 = [as32(t) for t in tuned], as32(base)
    # drop + epsilon = 1.2: the smallest magnitudes of each row are always dropped.
    result = call("della", base, *tuned, drop=0.9, epsilon=0.3, seed=1)
    np.testing.assert_allclose(
        result, reference_della(base32, tuned32, 0.9, 0.3, 1, "k"), rtol=RTOL, atol=ATOL
    )
    deltas = [t - base32 for t in tuned32]
    smallest = np.argmin(np.abs(deltas[0]), axis=1)
    pruned = reference_magprune(deltas[0], 0.9, 0.3, 1, "k", 0)[0]
    assert not pruned[np.arange(30), smallest].any()
    # drop 0 keeps the task vectors as they are and 1 drops them, whatever epsilon (mergekit).
    kept = call("della", base, *tuned, drop=0.0, epsilon=0.5)
    np.testing.assert_allclose(kept, base32 + sum(deltas) / 2, rtol=RTOL, atol=ATOL)
    assert np.array_equal(call("della_ties", base, *tuned, drop=1.0, epsilon=0.5), base32)


def test_della_masks_depend_on_seed_key_and_model():
    base, (a,) = models_near(1, shape=(50, 60))
    one = call("della", base, a, drop=0.5, seed=1, key="unet.a")
    assert np.array_equal(one, call("della", base, a, drop=0.5, seed=1, key="unet.a"))
    assert not np.array_equal(one, call("della", base, a, drop=0.5, seed=2, key="unet.a"))
    assert not np.array_equal(one, call("della", base, a, drop=0.5, seed=1, key="unet.b"))
    # The same task vector as model 0 and as model 1 is sampled differently.
    delta = as32(a) - as32(base)
    first, second = (reference_magprune(delta, 0.5, 0.1, 1, "unet.a", i)[1] for i in (0, 1))
    assert not np.array_equal(first, second)
    both = call("della", base, a, a, drop=0.5, seed=1, key="unet.a")
    assert not np.array_equal(both, one)


@pytest.mark.parametrize("spread", [0.05, 1e-4])
def test_sce_weights_task_vectors_by_mean_square(spread):
    # At spread 1e-4 the mean squares sum to under 1e-6: mergekit weighs equally.
    base, tuned = models_near(3, shape=(40, 50), spread=spread, dtype=np.float32)
    tuned[2] = base + 3 * (tuned[2] - base)  # one task vector weighs more
    result = call("sce", base, *tuned, select_topk=0.5)
    np.testing.assert_allclose(result, reference_sce(base, tuned, 0.5), rtol=RTOL, atol=ATOL)


# --- against mergekit ---------------------------------------------------------------------


class Mergekit:
    """mergekit 0.1.5's methods with a stable sort (ties by flat index, as sdrecipe)
    and DELLA's Bernoulli draw replaced by sdrecipe's documented mask."""

    # sdrecipe's name → mergekit's method.
    NAMES: ClassVar[dict[str, str]] = {
        "breadcrumbs": "breadcrumbs",
        "breadcrumbs_ties": "breadcrumbs_ties",
        "della": "della_linear",
        "della_ties": "della",
    }

    def __init__(self, monkeypatch):
        self.registry = pytest.importorskip("mergekit.merge_methods.registry")
        self.base = pytest.importorskip("mergekit.merge_methods.base")
        self.sce = pytest.importorskip("mergekit.merge_methods.sce")
        self.monkeypatch = monkeypatch
        sort, argsort = torch.sort, torch.argsort

        def topk(values, k, largest=True):
            ordered = sort(values, descending=largest, stable=True)
            return ordered.values[:k], ordered.indices[:k]

        monkeypatch.setattr(torch, "sort", lambda *a, **k: sort(*a, **k, stable=True))
        monkeypatch.setattr(torch, "argsort", lambda *a, **k: argsort(*a, **k, stable=True))
        monkeypatch.setattr(torch, "topk", topk)
        # How far mergekit's probabilities are from sdrecipe's, one per draw.
        self.deviations: list[float] = []

    def __call__(self, method: str, base, tuned, params: dict, key: str = "k") -> np.ndarray:
        p = dict(get_method(method).validate(params))
        shape = base.shape
        if method.startswith("della") and base.ndim > 2:
            # mergekit ranks along dim 1 of a tensor of more dimensions; sdrecipe ranks
            # each row of dim 0 whole: mergekit is given the rows.
            base, tuned = della_rows(base), [della_rows(t) for t in tuned]
        group = self.base.TensorGroup.from_tensors(
            [torch.from_numpy(as32(x)) for x in (base, *tuned)], base_index=0
        )
        if method == "sce":
            result = self.sce.sce_merge.implementation(group, select_topk=p["select_topk"])
            return (base + p["alpha"] * (result.numpy() - base)).reshape(shape)
        parameters = {"weight": 1.0, "normalize": True, "lambda": p["alpha"]}
        if method.startswith("breadcrumbs"):
            parameters.update(density=p["density"], gamma=p["gamma"])
        else:
            parameters.update(density=1 - p["drop"], epsilon=p["epsilon"], rescale=False)
            self._inject(
                [
                    reference_magprune(t - base, p["drop"], p["epsilon"], p["seed"], key, i)
                    for i, t in enumerate(tuned)
                ],
                p["rescale"],
            )
        merge = self.registry.get(self.NAMES[method])
        result = merge([group], parameters=parameters, dtype=torch.float32)[0]
        return result.numpy().reshape(shape)

    def _inject(self, pruned: list, rescale: bool) -> None:
        """torch.bernoulli answers each task vector's draw with sdrecipe's mask,
        divided by mergekit's probabilities where sdrecipe rescales (mergekit
        itself rescales the L1 norm instead: its `rescale` is off)."""
        queue = list(pruned)

        def bernoulli(probabilities, *args, **kwargs):
            _, keep, expected = queue.pop(0)
            self.deviations.append(float(np.abs(probabilities.numpy() - expected).max()))
            mask = torch.from_numpy(keep.astype(np.float32)).reshape(probabilities.shape)
            return mask / probabilities if rescale else mask

        self.monkeypatch.setattr(torch, "bernoulli", bernoulli)


@pytest.fixture
def mergekit(monkeypatch):
    return Mergekit(monkeypatch)


@pytest.mark.parametrize(("method", "setting"), CASES)
def test_methods_equal_mergekit(mergekit, method, setting):
    base, tuned = models_near(3, shape=(40, 6, 3), seed=10 + setting, dtype=np.float32)
    params = dict(SETTINGS[method][setting], sign="sum")  # mergekit's count rule differs
    if "sign" not in get_method(method).parameters.model_fields:
        del params["sign"]
    result = call(method, base, *tuned, key="unet.k", **params)
    expected = mergekit(method, base, tuned, params, key="unet.k")
    np.testing.assert_allclose(result, expected, rtol=RTOL, atol=ATOL)
    if method.startswith("della"):
        assert len(mergekit.deviations) == 3 and max(mergekit.deviations) < 1e-6


# --- from recipes -------------------------------------------------------------------------

# Each method at two settings in one build: one for the text encoder, one for the rest.
BUILT = {
    "breadcrumbs": (
        SETTINGS["breadcrumbs"][0],
        dict(density=0.5, gamma=0.1, alpha=0.7),
    ),
    "breadcrumbs_ties": (SETTINGS["breadcrumbs_ties"][0], dict(density=0.3, gamma=0.2, alpha=0.6)),
    "della": (dict(drop=0.4, epsilon=0.2, seed=5), dict(drop=0.7, epsilon=0.25, seed=5)),
    "della_ties": (dict(drop=0.5, epsilon=0.1, seed=6), dict(drop=0.2, epsilon=0.15, seed=6)),
    "sce": (SETTINGS["sce"][0], dict(select_topk=1.0, alpha=0.5)),
}


def built_call(method: str, models: str = "C, A, B") -> str:
    """`method(models, ...)` with each number per component as in BUILT."""
    defaults = get_method(method).validate({})
    rest, text = ({**defaults, **values} for values in BUILT[method])
    params = []
    for name in BUILT[method][0].keys() | BUILT[method][1].keys():
        if rest[name] == text[name]:
            params.append(f"{name}={rest[name]}")
        else:
            params.append(f"{name}={{default: {rest[name]}, text_encoder: {text[name]}}}")
    return f"{method}({models}, {', '.join(params)})"


def build(
    folder: Path, inputs: dict, calls: dict[str, str], threads: int = 2, keys: str | None = None
) -> dict:
    """Build `name: call` nodes over `inputs` (at the keys regex `keys` matches, if
    given) as float32 outputs; their tensors by name."""
    selection = f", include_keys: ['{keys}']" if keys else ""
    nodes = "\n".join(
        f'  {name}: {{expression: "{text}"{selection}}}' for name, text in calls.items()
    )
    outputs = "\n".join(f"  {name}: {{path: {name}.safetensors, dtype: float32}}" for name in calls)
    recipe = write_recipe(
        folder,
        "inputs: {" + ", ".join(f"{k}: {v}" for k, v in inputs.items()) + "}\n"
        f"nodes:\n{nodes}\noutputs:\n{outputs}\n",
    )
    update_outputs(prepare(recipe), threads=threads)
    return {name: load_file(folder / f"{name}.safetensors") for name in calls}


@pytest.fixture(scope="module")
def built(tmp_path_factory, models):
    inputs = {"A": models["finetune"], "B": models["other"], "C": models["base"]}
    return build(tmp_path_factory.mktemp("sparse"), inputs, {m: built_call(m) for m in METHODS})


@pytest.mark.parametrize("method", METHODS)
def test_every_key_of_a_build_equals_mergekit(mergekit, built, arrays, method):
    a, b, c = (arrays[name] for name in ("finetune", "other", "base"))
    out = built[method]
    assert out.keys() == c.keys()
    compared = {"unet": 0, "text_encoder": 0}
    for key, value in out.items():
        if not np.issubdtype(c[key].dtype, np.floating):
            np.testing.assert_array_equal(value, c[key], err_msg=key)  # position ids
            continue
        component = component_of(key, "sd1")
        params = BUILT[method][component == "text_encoder"]
        base, tuned = as32(c[key]), [as32(a[key]), as32(b[key])]
        expected = mergekit(method, base, tuned, params, key=key)
        np.testing.assert_allclose(value, expected, rtol=RTOL, atol=ATOL, err_msg=key)
        compared[component] = compared.get(component, 0) + 1
    assert compared["unet"] > 500 and compared["text_encoder"] > 100, compared
    assert max(mergekit.deviations, default=0.0) < 1e-6


def test_della_gives_the_same_bytes_at_one_and_two_threads(tmp_path, models, built):
    inputs = {"A": models["finetune"], "B": models["other"], "C": models["base"]}
    again = build(tmp_path, inputs, {"della": built_call("della")}, threads=1)["della"]
    assert again.keys() == built["della"].keys()
    for key, value in again.items():
        assert value.tobytes() == built["della"][key].tobytes(), key


def test_methods_follow_the_inpainting_channel_rule(tmp_path, models, arrays):
    inputs = {"A": models["inpainting"], "B": models["finetune"], "C": models["base"]}
    calls = {m: built_call(m, "A, B, C") for m in METHODS}
    outs = build(tmp_path, inputs, calls, keys=r"input_blocks\.0\.0\.weight$")
    a = as32(arrays["inpainting"][UNET_IN])
    for method, out in outs.items():
        merged = out[UNET_IN]
        assert merged.shape == a.shape, method
        np.testing.assert_array_equal(merged[:, 4:], a[:, 4:], err_msg=method)
        assert not np.array_equal(merged[:, :4], a[:, :4]), method


@pytest.mark.parametrize("method", METHODS)
def test_methods_never_modify_their_operands(method):
    """float32 operands reach a method without a copy: it must leave them as they are."""
    base, tuned = models_near(2, shape=(40, 30), dtype=np.float32)
    operands = [base, *tuned]
    before = [o.copy() for o in operands]
    call(method, *operands, **SETTINGS[method][0])
    for operand, original in zip(operands, before, strict=True):
        np.testing.assert_array_equal(operand, original)


@pytest.mark.parametrize("method", METHODS)
def test_methods_declare_typed_bounded_parameters(method):
    spec = get_method(method)
    assert not spec.elementwise and spec.takes_dtype
    assert spec.key_aware == method.startswith("della")
    for name in ("density", "gamma", "drop", "epsilon", "select_topk"):
        if name in spec.parameters.model_fields:
            with pytest.raises(ValueError, match=f"{method}: parameter '{name}'"):
                spec.validate({name: 1.5})
            with pytest.raises(ValueError, match=name):
                spec.validate({name: -0.1})
